"""The shared task wrapper of every entry point (explain_prune.cli.task)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from explain_prune.cli import task
from explain_prune.core import InputError


@task
def threads_seen(cfg) -> int:
    return torch.get_num_threads()


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.mark.parametrize("requested", [1, 2])
def test_torch_threads_is_applied_before_the_task_runs(restore_threads, requested):
    assert threads_seen(OmegaConf.create({"torch_threads": requested})) == requested


def test_null_torch_threads_keeps_torch_default(restore_threads):
    assert threads_seen(OmegaConf.create({"torch_threads": None})) == restore_threads
    assert threads_seen(OmegaConf.create({})) == restore_threads


def test_input_error_is_one_line_and_exit_2(capsys):
    @task
    def bad(cfg) -> None:
        raise InputError("retention must be in (0, 1], got 2.0")

    with pytest.raises(SystemExit) as exit_info:
        bad(OmegaConf.create({}))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: retention must be in (0, 1], got 2.0\n"
