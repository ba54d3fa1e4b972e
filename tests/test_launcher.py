"""The `launcher` group: a real evaluate job through submitit's local executor (the same launcher plugin
code path as SLURM, in a separate process), and `launcher=slurm` against a mocked submitit executor that
records the SLURM parameters it is given — no cluster needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import ClassVar

import pytest
import submitit
from helpers import ROOT
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

AutoExecutor = submitit.AutoExecutor  # the real one, kept before a test replaces it


def test_evaluate_job_runs_through_submitit_local(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "explain_prune.evaluate", "-m", "hydra/launcher=submitit_local",
         "hydra.launcher.timeout_min=10", "benchmark.limit=2", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((sweep / "synthetic/synthetic/vanilla/r1.0/results.json").read_text())
    assert results["num_samples"] == 2 and results["complete"] is True
    assert results["choices"]["hydra/launcher"] == "submitit_local"
    # the job ran in submitit's worker process, which logged evaluate's output next to its pickled result
    logs = [p for p in (sweep / ".submitit").glob("*/*_0_log.out")]
    assert len(logs) == 1 and "results: " in logs[0].read_text()
    assert list(logs[0].parent.glob("*_0_result.pkl"))


def compose_cfg(config: str, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(config, overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("config", ["evaluate", "generate", "train"])
def test_launcher_group_in_every_entry_point(config):
    assert compose_cfg(config).hydra.launcher._target_.endswith("BasicLauncher")  # launcher=local, the default
    slurm = compose_cfg(config, "launcher=slurm").hydra.launcher
    assert slurm._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (slurm.gpus_per_node, slurm.array_parallelism, slurm.max_num_timeout) == (1, 16, 3)


class FakeExecutor:
    """Stands in for submitit.AutoExecutor: records what the launcher configures and submits."""

    instances: ClassVar[list[FakeExecutor]] = []

    def __init__(self, cluster: str, **init: object):
        self.cluster, self.init, self.params, self.submitted = cluster, init, {}, []
        FakeExecutor.instances.append(self)

    def update_parameters(self, **params: object) -> None:
        self.params.update(params)

    def map_array(self, fn, *columns):
        self.submitted = list(zip(*columns))
        return [FakeJob(i) for i in range(len(self.submitted))]


class FakeJob:
    def __init__(self, index: int):
        self.index = index

    def results(self) -> list[str]:
        return [f"job {self.index}"]


def test_slurm_launcher_hands_its_parameters_to_submitit(tmp_path, monkeypatch):
    cfg = compose_cfg(
        "evaluate", "launcher=slurm", "hydra.launcher.partition=gpu-a100", "hydra.launcher.timeout_min=90",
        "hydra.launcher.array_parallelism=4", "hydra.job.name=evaluate", f"hydra.sweep.dir={tmp_path}",
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    FakeExecutor.instances.clear()
    jobs = [["model=qwen2vl", "benchmark=mmstar"], ["model=qwen2vl", "benchmark=pope"], ["model=llava_ov", "benchmark=pope"]]

    assert launcher.launch(jobs, initial_job_idx=0) == ["job 0", "job 1", "job 2"]
    (executor,) = FakeExecutor.instances
    assert executor.cluster == "slurm"
    assert executor.init == {"folder": f"{tmp_path}/.submitit/%j", "slurm_max_num_timeout": 3}
    expected = {"slurm_partition": "gpu-a100", "gpus_per_node": 1, "tasks_per_node": 1, "cpus_per_task": 8, "mem_gb": 64,
                "timeout_min": 90, "slurm_array_parallelism": 4, "name": "evaluate"}
    assert {k: executor.params.get(k) for k in expected} == expected
    # one array task per job, in order, each with its own job number
    assert [(list(s[0]), s[1], s[2]) for s in executor.submitted] == [(j, "hydra.sweep.dir", i) for i, j in enumerate(jobs)]
    # submitit's own validation accepts every name (its debug executor checks the slurm_* names too)
    real = AutoExecutor(folder=tmp_path / "check", cluster="debug", **{k: v for k, v in executor.init.items() if k != "folder"})
    real.update_parameters(**executor.params)
