"""evaluate's bookkeeping: one offline W&B run per job holding the metrics and no secret, and a
rerun that skips a complete job without loading the model (but reruns a changed or incomplete one)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from helpers import ROOT
from test_evaluate import mmstar_root  # noqa: F401  (the MMStar fixture writer)

from explain_prune import evaluate, tracking

SECRET = "sk-test-0123456789abcdef"


def run_inprocess(monkeypatch, run_dir: Path, *overrides: str) -> None:
    """`python -m explain_prune.evaluate ...` in this process (Hydra needs the config dir as a path)."""
    monkeypatch.setattr(sys, "argv", ["evaluate", "--config-path", str(ROOT / "conf"), "model=tiny_qwen2vl",
                                      "benchmark=mmstar", f"hydra.run.dir={run_dir}", *overrides])
    evaluate.main()


def test_scrub_masks_secret_values_and_secret_keys(monkeypatch):
    monkeypatch.setenv("EP_TEST_KEY", SECRET)
    config = {"judge": {"api_key_env": "EP_TEST_KEY", "base_url": f"https://h/{SECRET}/v1", "max_tokens": 3},
              "extra": [{"api_key": "literal", "token": None}], "hf_token": "hf_x"}
    secrets = tracking.secret_values(config)
    assert secrets == [SECRET]
    assert tracking.scrub(config, secrets) == {
        "judge": {"api_key_env": "EP_TEST_KEY", "base_url": "https://h/***/v1", "max_tokens": 3},
        "extra": [{"api_key": "***", "token": None}], "hf_token": "***",
    }


def test_offline_wandb_run_has_the_metrics_and_no_secret(mmstar_root, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("EP_TEST_JUDGE_KEY", SECRET)
    run = tmp_path / "run"
    # the judge is configured (unused by MMStar) and its key also leaks into a resolved URL: both must be masked
    run_inprocess(monkeypatch, run, f"benchmark.root={mmstar_root}", "benchmark.limit=2", "method=fastv", "retention=r0.5",
                  "judge=openai_compatible", "judge.api_key_env=EP_TEST_JUDGE_KEY", "judge.cache_dir=null",
                  "judge.base_url=https://judge.invalid/${oc.env:EP_TEST_JUDGE_KEY}/v1")
    results = json.loads((run / "results.json").read_text())
    assert results["complete"] is True and results["job"]["judge"]["base_url"] == "https://judge.invalid/***/v1"

    import wandb

    wandb.teardown()  # run.finish() returns before the service has written the run file; this waits for it
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("run-*.wandb")).read_bytes()

    def logged(key: str) -> list[float]:
        # a protobuf HistoryItem: key (field 1), then value_json (field 16: tag bytes 0x82 0x01, length, JSON)
        found = re.finditer(re.escape(key.encode()) + rb"\x82\x01(.)", log, re.S)
        return [json.loads(log[m.end(): m.end() + m.group(1)[0]]) for m in found]

    expected = {"score/overall": results["score"]["overall"],
                **{f"efficiency/{k}": results["efficiency"][k]
                   for k in ("flops_T", "vanilla_flops_T", "layer_avg_retention", "kv_cache_bytes", "num_visual")}}
    for key, value in expected.items():
        values = logged(key)
        assert values and all(v == pytest.approx(value) for v in values), (key, values, value)
    assert b"tiny_qwen2vl/mmstar/fastv/r0.5" in log  # the group (no experiment: the run_id)
    assert b"https://judge.invalid/***/v1" in log  # the config was logged, scrubbed
    leaks = [p for p in run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []


def test_complete_job_is_skipped_without_loading_the_model(mmstar_root, tmp_path, monkeypatch, capsys):  # noqa: F811
    loads = []
    real_build = evaluate.build_vlm
    monkeypatch.setattr(evaluate, "build_vlm", lambda *a, **k: loads.append(1) or real_build(*a, **k))
    run = tmp_path / "run"
    base = (f"benchmark.root={mmstar_root}", "method=vanilla")
    run_inprocess(monkeypatch, run, *base, "benchmark.limit=2", "method.retention=1.0")
    first = (run / "results.json").read_bytes()
    assert len(loads) == 1 and json.loads(first)["complete"] is True

    # the same job, also when reached under another spelling of the same settings
    for retention in ("method.retention=1.0", "method.retention=1"):
        capsys.readouterr()
        run_inprocess(monkeypatch, run, *base, "benchmark.limit=2", retention)
        assert "skip:" in capsys.readouterr().out
        assert len(loads) == 1 and (run / "results.json").read_bytes() == first

    # a larger limit is another job: it runs, resuming the two logged predictions
    run_inprocess(monkeypatch, run, *base, "benchmark.limit=3")
    assert len(loads) == 2
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 3
    assert json.loads((run / "results.json").read_text())["num_samples"] == 3

    # results not flagged complete are never trusted
    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**results, "complete": False}))
    run_inprocess(monkeypatch, run, *base, "benchmark.limit=3")
    assert len(loads) == 3 and json.loads((run / "results.json").read_text())["complete"] is True

    # a smaller limit scores only the requested samples, though the log holds more
    run_inprocess(monkeypatch, run, *base, "benchmark.limit=1")
    assert json.loads((run / "results.json").read_text())["num_samples"] == 1


@pytest.mark.parametrize("cfg_key", ["method.options", "judge"])
def test_job_identity_changes_with_settings_that_change_results(cfg_key):
    """Options and the judge are part of the identity: changing them must not reuse old results."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        a = compose(config_name="evaluate", overrides=["model=tiny_qwen2vl", "benchmark=mmstar", "method=fastv"])
        change = "method.options.layer=1" if cfg_key == "method.options" else "judge=fake"
        b = compose(config_name="evaluate", overrides=["model=tiny_qwen2vl", "benchmark=mmstar", "method=fastv", change])
    assert tracking.job_identity(a, 0.5) != tracking.job_identity(b, 0.5)
    assert tracking.job_identity(a, 0.5) != tracking.job_identity(a, 0.25)
    assert tracking.job_identity(a, 0.5) == tracking.job_identity(a.copy(), 0.5)
