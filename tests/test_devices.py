"""Slot planning and worker commands are pure: every case checked without a GPU."""

from __future__ import annotations

import pytest

from sweeper.errors import DeviceError
from sweeper.run.devices import Slot, count_cpus, plan, plan_slots
from sweeper.run.launcher import worker_args, worker_environment
from tests.conftest import StudyDir, run_sweeper, study


def test_auto_without_gpu_uses_cpu_workers_sharing_the_cores() -> None:
    slots = plan_slots("auto", gpu_count=0, cpu_count=8, cpu_workers=4)
    assert slots == [Slot(i, None, 2) for i in range(4)]
    assert slots[0].device == "cpu"


def test_auto_takes_every_gpu_times_trials_per_device() -> None:
    slots = plan_slots("auto", gpu_count=2, cpu_count=16, trials_per_device=2)
    assert [(s.index, s.gpu) for s in slots] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert {s.threads for s in slots} == {4}
    assert slots[2].device == "cuda:1"


def test_cpu_ignores_gpus_and_listed_gpus_are_kept() -> None:
    assert {s.gpu for s in plan_slots("cpu", gpu_count=4, cpu_count=2)} == {None}
    assert [s.gpu for s in plan_slots([0, 2], gpu_count=4, cpu_count=8)] == [0, 2]


def test_more_workers_than_cores_still_get_one_thread() -> None:
    assert {s.threads for s in plan_slots("cpu", 0, cpu_count=2, cpu_workers=8)} == {1}


@pytest.mark.parametrize(
    ("devices", "count", "message"),
    [
        ([3], 2, "GPU 3 does not exist; this machine has GPUs 0-1"),
        ([0], 0, "GPU 0 does not exist; this machine has no GPU"),
        ([1, 1], 2, "a GPU is listed twice"),
    ],
)
def test_bad_gpu_lists(devices: list[int], count: int, message: str) -> None:
    with pytest.raises(DeviceError, match=message):
        plan_slots(devices, gpu_count=count, cpu_count=4)


def test_gpu_worker_sees_only_its_gpu_with_its_share_of_threads() -> None:
    env = worker_environment(Slot(3, 1, 4), {"PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["OMP_NUM_THREADS"] == "4"
    assert env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["PATH"] == "/bin"
    assert worker_args(Slot(3, 1, 4), since=7) == {"slot": [3, 0, 4], "since": 7}


def test_gpu_index_maps_through_the_callers_visible_devices() -> None:
    env = worker_environment(Slot(0, 1, 1), {"CUDA_VISIBLE_DEVICES": "5,7"})
    assert env["CUDA_VISIBLE_DEVICES"] == "7"


def test_gpu_index_means_the_nvidia_smi_numbering() -> None:
    """Slots are planned from nvidia-smi's numbering, which is PCI bus order; CUDA numbers
    the devices fastest first unless told otherwise: on mixed GPUs the two differ."""
    env = worker_environment(Slot(0, 1, 1), {"PATH": "/bin"})
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    chosen = worker_environment(Slot(0, 1, 1), {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"})
    assert chosen["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"  # the caller's choice stands
    assert "CUDA_DEVICE_ORDER" not in worker_environment(Slot(0, None, 1), {})


def test_cpu_worker_sees_no_gpu() -> None:
    env = worker_environment(Slot(0, None, 2), {"CUDA_VISIBLE_DEVICES": "0"})
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert worker_args(Slot(0, None, 2), since=None) == {"slot": [0, None, 2], "since": None}


def test_cpu_workers_are_capped_at_the_cores_with_a_warning() -> None:
    planned = plan("cpu", gpu_count=0, cpu_count=4, cpu_workers=10_000)
    assert planned.slots == [Slot(i, None, 1) for i in range(4)]
    assert planned.warnings == [
        "resources.cpu_workers = 10000 is more than the 4 cores this process may use; "
        "running 4 CPU workers"
    ]
    assert plan_slots("cpu", gpu_count=0, cpu_count=4, cpu_workers=10_000) == planned.slots
    assert plan("cpu", gpu_count=0, cpu_count=4, cpu_workers=4).warnings == []


def test_never_more_slots_than_trials() -> None:
    cpu = plan("cpu", gpu_count=0, cpu_count=8, cpu_workers=4, n_trials=2)
    assert cpu.slots == [Slot(0, None, 4), Slot(1, None, 4)] and cpu.warnings == []
    gpu = plan_slots("auto", gpu_count=2, cpu_count=8, trials_per_device=4, n_trials=3)
    assert [(s.index, s.gpu, s.threads) for s in gpu] == [(0, 0, 2), (1, 0, 2), (2, 1, 2)]
    assert len(plan_slots([1, 0], gpu_count=2, cpu_count=8, n_trials=1)) == 1


def test_ten_thousand_cpu_workers_pass_check_as_the_cores(study_dir: StudyDir) -> None:
    path = study_dir.write(study(resources={"devices": "cpu", "cpu_workers": 10_000}))
    result = run_sweeper("check", str(path), timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"ok; {count_cpus()} slot(s) on cpu" in result.stdout
    assert study_dir.created() == []


def test_a_gpu_trial_names_its_gpu_as_nvidia_smi_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: torch's device properties are stood in for (a Hopper at bus 3b)."""
    import types

    import torch

    from sweeper.run.trial import gpu_used

    props = types.SimpleNamespace(
        name="NVIDIA H200", pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index: 812 * 2**20)
    assert gpu_used(0) == {"gpu": "NVIDIA H200 00000000:3B:00.0", "gpu_peak_mb": 812.0}
    older = types.SimpleNamespace(name="Tesla T4")  # a torch without the PCI ids
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: older)
    assert gpu_used(0)["gpu"] == "Tesla T4"
