"""Faults a user meets with real commands: a second writer, a killed one, damaged artefacts, outputs that
cannot be written, Hydra's own errors.  Each case asserts the exit code, the one line, and that nothing
was lost (docs/failures.md)."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from explain_prune.compress.network import FTheta, FThetaConfig, load_compressor, save_compressor
from explain_prune.core import InputError, default_file_mode
from explain_prune.data.cache import CacheReader, CacheWriter, make_meta, read_meta

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def start(module: str, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"explain_prune.{module}", *overrides], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(module: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"explain_prune.{module}", *overrides], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def held(lock: Path) -> bool:
    """Whether another process holds the flock on `lock` (probed without keeping it)."""
    if not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def wait_until_held(lock: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not held(lock):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{lock} was never locked"
        time.sleep(0.2)


def kill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: no cleanup runs in the holder
    proc.communicate()


def refusal(what: str, lock: Path, holder: subprocess.Popen) -> str:
    return (f"error: {what} is being written by another job (pid {holder.pid} on {socket.gethostname()}; "
            f"lock file {lock}); wait for it to finish, or write elsewhere")


# ----------------------------------------------------------------------------- second writers, killed writers


def test_a_second_generate_on_a_cache_stops_and_a_killed_one_leaves_nothing_behind(tmp_path):
    """Two generate jobs on one cache part used to both exit 0 with a corrupt index.  Now the second
    stops at once; the first, SIGKILLed before its first shard, leaves no meta.json, so a rerun with
    other relevance settings is not refused; its loader worker does not keep the lock alive."""
    cache = tmp_path / "cache"
    lock = cache / ".lock-part000of001"
    common = [f"cache_dir={cache}", "torch_threads=1"]
    first = start("generate", *common, "data.limit=400", "shard_size=1000", "num_workers=1", f"hydra.run.dir={tmp_path / 'a'}")
    try:
        wait_until_held(lock, first)
        second = run("generate", *common, "data.limit=4", f"hydra.run.dir={tmp_path / 'b'}")
        assert second.returncode == 2
        assert error_lines(second.stderr) == [refusal(f"cache {cache} (part part000of001)", lock, first)]
        assert "Loading weights" not in second.stderr  # stopped before its model loaded
    finally:
        kill(first)
    assert not (cache / "meta.json").exists()
    rerun = run("generate", *common, "data.limit=6", "shard_size=4", "relevance.head_reduce=mean",
                f"hydra.run.dir={tmp_path / 'c'}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_meta(cache)["config"]["relevance"]["head_reduce"] == "mean"
    ids = [s.id for s in CacheReader(cache)]
    assert len(ids) == len(set(ids)) == 6


def test_a_second_evaluate_on_a_run_dir_stops_and_a_killed_one_resumes(tmp_path):
    run_dir = tmp_path / "run"
    lock = run_dir / ".lock"
    common = ["benchmark=synthetic", "torch_threads=1", f"hydra.run.dir={run_dir}"]
    first = start("evaluate", *common, "benchmark.limit=500", "num_workers=1")
    try:
        wait_until_held(lock, first)
        second = run("evaluate", *common, "benchmark.limit=500")
        assert second.returncode == 2
        assert error_lines(second.stderr) == [refusal(f"evaluate run dir {run_dir}", lock, first)]
    finally:
        kill(first)
    rerun = run("evaluate", *common, "benchmark.limit=24")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ids = [json.loads(line)["id"] for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) >= 24
    results = json.loads((run_dir / "results.json").read_text())
    assert results["complete"] is True and results["num_samples"] == 24


def test_an_empty_cache_with_other_settings_is_replaced_not_refused(tmp_path):
    old, new = make_meta("m", "d", "image", config={"v": 1}), make_meta("m", "d", "image", config={"v": 2})
    CacheWriter(tmp_path, old).close()  # caches nothing: no meta.json
    assert not (tmp_path / "meta.json").exists()
    (tmp_path / "meta.json").write_text(json.dumps(old))  # as an older version of the writer left it
    with CacheWriter(tmp_path, new) as writer:
        writer.add("a", torch.ones(3), torch.ones(3))
    assert read_meta(tmp_path)["config_hash"] == new["config_hash"]
    with pytest.raises(InputError, match="config_hash"):  # a cache holding samples is still refused
        CacheWriter(tmp_path, old)


# ----------------------------------------------------------------------------- damaged artefacts


def test_a_damaged_prediction_line_is_named(tmp_path):
    common = ["benchmark=synthetic", "torch_threads=1", "num_workers=0", f"hydra.run.dir={tmp_path}"]
    assert run("evaluate", *common, "benchmark.limit=3").returncode == 0
    log = tmp_path / "predictions.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + '{"id": "trunc\n' + "".join(lines[2:]))
    proc = run("evaluate", *common, "benchmark.limit=4")
    assert proc.returncode == 2
    [line] = error_lines(proc.stderr)
    assert line.startswith(f"error: {log} line 2: not JSON (")
    assert line.endswith("; delete that line to resume (its sample is then predicted again)")
    assert log.read_text().count("\n") == 3  # nothing was dropped or rewritten


def ftheta_file(path: Path, state: dict | None = None, config: str | None = None) -> Path:
    net = FTheta(FThetaConfig(channels=[4, 4]))
    save_compressor(path, net)
    tensors = load_file(str(path))
    tensors.update(state or {})
    metadata = {"format": "explain_prune.ftheta/1",
                "ftheta_config": config if config is not None else json.dumps(net.config.to_dict())}
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(("case", "message"), [
    ("nan", "non-finite values in weight 'head.weight'"),
    ("not_json", "malformed ftheta_config metadata (Expecting property name enclosed in double quotes"),
    ("channels_text", "malformed ftheta_config metadata (invalid literal for int() with base 10: 'a')"),
    ("channels_zero", "compressor channels must be a non-empty list of ints in [1, 8192], got [0]"),
    ("unknown_key", "compressor config has unknown keys ['depth']"),
])
def test_a_bad_ftheta_file_is_one_line_naming_it(tmp_path, case, message):
    config = FThetaConfig(channels=[4, 4]).to_dict()
    path = tmp_path / f"{case}.safetensors"
    if case == "nan":
        weight = load_file(str(ftheta_file(path)))["head.weight"]
        ftheta_file(path, state={"head.weight": torch.full_like(weight, float("nan"))})
    elif case == "not_json":
        ftheta_file(path, config="{channels: [4")
    elif case == "channels_text":
        ftheta_file(path, config=json.dumps({**config, "channels": "abc"}).replace('"abc"', '["a"]'))
    elif case == "channels_zero":
        ftheta_file(path, config=json.dumps({**config, "channels": [0]}))
    else:
        ftheta_file(path, config=json.dumps({**config, "depth": 3}))
    with pytest.raises(InputError) as err:
        load_compressor(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: ") and message in text, text


def test_an_ftheta_file_with_nan_weights_stops_evaluate_at_config_time(tmp_path):
    path = tmp_path / "nan.safetensors"
    weight = load_file(str(ftheta_file(path)))["head.weight"]
    ftheta_file(path, state={"head.weight": torch.full_like(weight, float("nan"))})
    proc = run("evaluate", "method=ours", f"method.options.checkpoint={path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [f"error: method (ours): {path}: non-finite values in weight 'head.weight'"]
    assert not (tmp_path / "run" / "predictions.jsonl").exists()


class Trap:
    """A pickle that creates a file when unpickled: a loader that runs it is not weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(("case", "message"), [
    ("text", "not a Lightning checkpoint readable with weights_only=True (KeyError: 101)"),
    ("zip", "not a Lightning checkpoint readable with weights_only=True (OSError: [Errno 22] Invalid argument)"),
    ("pickle", "not a Lightning checkpoint readable with weights_only=True (Unsupported global: GLOBAL getattr was not an allowed global by default."),
    ("plain_dict", "not a checkpoint written by explain_prune.train (no state_dict / epoch / hyper_parameters)"),
])
def test_a_bad_ckpt_path_is_one_line_before_any_cache_is_read(tmp_path, case, message):
    from explain_prune.stages.train import read_checkpoint

    path, marker = tmp_path / f"{case}.ckpt", tmp_path / "unpickled"
    if case == "text":
        path.write_bytes(b"hello world\n" * 200)
    elif case == "zip":
        path.write_bytes(b"PK\x03\x04 not a checkpoint" * 200)
    elif case == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": Trap(marker), "epoch": 0, "hyper_parameters": {}}, protocol=2))
    else:
        torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(InputError) as err:
        read_checkpoint(path)
    assert str(err.value).startswith(f"ckpt_path {path}: ") and message in str(err.value), str(err.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------- outputs, Hydra's own errors


def test_an_output_that_cannot_be_written_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = run("evaluate", "benchmark.limit=2", f"hydra.run.dir={blocker / 'run'}")
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [f"error: [Errno 20] Not a directory: '{blocker / 'run'}'"]
    gen = run("generate", f"cache_dir={blocker / 'cache'}", "data.limit=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert gen.returncode == 2
    assert error_lines(gen.stderr) == [f"error: [Errno 20] Not a directory: '{blocker / 'cache'}'"]
    assert "Loading weights" not in gen.stderr  # the cache dir is claimed before the model loads


@pytest.mark.parametrize(("module", "override", "line"), [
    ("generate", "benchmark=mmstar", "error: benchmark: not a group of generate (its groups: paths, model, data, modality, relevance, launcher)"),
    ("evaluate", "model.foo=1", "error: Could not override 'model.foo'. To append to your config use +model.foo=1"),
    ("evaluate", "benchmark.limit=[", "error: benchmark.limit=[: no viable alternative at input '['"),
])
def test_hydras_own_errors_are_one_line_and_exit_2(tmp_path, module, override, line):
    proc = run(module, override, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    [got] = error_lines(proc.stderr)
    assert got.startswith(line), got


@pytest.mark.parametrize(("module", "groups"), [
    ("generate", ["paths", "model", "data", "modality", "relevance", "launcher"]),
    ("train", ["paths", "model", "data", "modality", "compressor", "relevance", "trainer", "logger", "launcher", "debug"]),
])
def test_help_lists_the_groups_the_entry_point_uses(module, groups):
    proc = run(module, "--help")
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.split("):\n", 1)[1].split("\n\n", 1)[0]  # the lines under "Groups (...):"
    listed = [line.split()[0] for line in table.splitlines()]
    assert listed == groups, proc.stdout
    assert "benchmark" not in listed and "judge" not in listed


# ----------------------------------------------------------------------------- file modes


def test_caches_and_ftheta_files_get_the_umask_mode(tmp_path):
    with CacheWriter(tmp_path / "cache", make_meta("m", "d", "image"), shard_size=1) as writer:
        writer.add("a", torch.ones(3), torch.ones(3))
    made = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    made.append(save_compressor(tmp_path / "f.safetensors", FTheta(FThetaConfig(channels=[4]))))
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in made} == {p.name: oct(default_file_mode()) for p in made}
