"""What changes on an accelerator, checked without one: group jobs that share a GPU allocate as
they go, the memory check reads what the device really has free, XLA's caches are kept."""

import pytest
from omegaconf import OmegaConf

from nstjax import driver
from nstjax.run import share_the_device


@pytest.mark.parametrize("launcher, shared", [
    ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, False),
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 4}, True),
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 1}, False),
    ({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "tasks_per_node": 4,
      "gpus_per_task": None}, True),
    ({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "tasks_per_node": 4,
      "gpus_per_task": 1}, False),
    ({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "tasks_per_node": 1}, False),
])
def test_jobs_that_run_together_on_one_machine_share_its_device(launcher, shared):
    assert share_the_device(OmegaConf.create(launcher)) is shared


def test_the_memory_check_takes_what_the_device_has_free():
    stats = {"bytes_limit": 60 << 30, "bytes_in_use": 10 << 30}
    assert driver.accelerator_free(stats, None) == 50 << 30  # alone on the device: the allocator's room
    assert driver.accelerator_free(stats, 20 << 30) == 20 << 30  # other processes hold the rest
    assert driver.accelerator_free(stats, 80 << 30) == 50 << 30
    assert driver.accelerator_free(None, 5 << 30) == 5 << 30 and driver.accelerator_free({}, None) is None


def test_gpu_free_bytes_reads_nvidia_smi(monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho \"$@\" > " + str(tmp_path / "args") + "\nprintf '81000\\n2000\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert driver.gpu_free_bytes() == 2000 * 2**20  # the least free of the visible GPUs, MiB
    assert "--id=2,3" in (tmp_path / "args").read_text()
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert driver.gpu_free_bytes() is None
