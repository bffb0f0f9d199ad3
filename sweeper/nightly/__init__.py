"""Nightly sweeps: one dated study a night, warm-started from the last; their schedules."""
