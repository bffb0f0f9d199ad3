"""The core loop across processes: devices, launcher, worker, trial, callbacks, guards."""
