"""explain_prune.train end to end on small planted caches (compose API in-process; the CLI in subprocesses)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import load_file, save_file

from explain_prune.compress.network import load_compressor
from explain_prune.core import InputError, write_json_atomic
from explain_prune.data.cache import CacheWriter, make_meta
from planted import write_planted_cache
from explain_prune.stages.train import run

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FAST = [
    "torch_threads=1",
    "datamodule.num_workers=0",
    "datamodule.batch_size=32",
    "compressor.net.channels=[16,16,16,16,16]",
    "compressor.lr=1e-2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
]
# the planted caches stand in for tiny_qwen2vl's; never build the synthetic default cache here
PINNED = ["model=tiny_qwen2vl", "data.auto_generate=false"]


def pinned(args) -> list[str]:
    """PINNED, minus any key the caller sets itself (Hydra refuses two values for one key)."""
    given = {a.split("=", 1)[0] for a in args}
    return list(args) + [p for p in PINNED if p.split("=", 1)[0] not in given]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_root")
    write_planted_cache(root / "tiny_qwen2vl" / "synthetic" / "image", 320, 40, 80, shard_size=64)
    return root


def compose_cfg(cache_root: Path, out: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"paths.cache_root={cache_root}", f"paths.log_dir={out}", f"paths.output_dir={out}", *FAST, *pinned(overrides)],
        )
    GlobalHydra.instance().clear()
    return cfg


def train(cache_root: Path, out: Path, *overrides: str) -> dict:
    threads = torch.get_num_threads()
    try:
        return run(compose_cfg(cache_root, out, list(overrides)), out)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def four_epochs(cache_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run4")
    return train(cache_root, out, "trainer.max_epochs=4")


def test_training_beats_both_baselines(four_epochs, capsys):
    r = four_epochs
    kl = r["metrics"]["val/kl"]
    assert kl < r["baselines"]["val/baseline/uniform_kl"]
    assert kl < r["baselines"]["val/baseline/a0_kl"]
    assert r["metrics"]["val/recall@10"] > r["baselines"]["val/baseline/a0_recall@10"]
    for key in ("best_checkpoint", "last_checkpoint", "compressor", "metrics_csv", "results_json"):
        assert Path(r[key]).is_file(), key
    assert json.loads(Path(r["results_json"]).read_text())["metrics"]["val/kl"] == pytest.approx(kl)
    # the exported f_θ is the best checkpoint's network, rebuilt from the file alone
    net = load_compressor(r["compressor"])
    assert net.config.a0_query == "instruction"  # a cache without the option holds the paper's A_v^0
    ckpt = torch.load(r["best_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["ftheta"]["channels"] == [16] * 5
    assert torch.equal(net.head.weight, ckpt["state_dict"]["net.head.weight"])


def _set_a0_query(directory: Path, query: str) -> None:
    """Mark a planted cache as built with relevance.a0_query=<query> (what generate records)."""
    meta = json.loads((directory / "meta.json").read_text())
    meta["config"] = {**meta["config"], "relevance": {"a0_query": query}}
    (directory / "meta.json").write_text(json.dumps(meta))


def test_ftheta_file_records_the_caches_a0_query(tmp_path):
    root = tmp_path / "cache"
    primary = root / "tiny_qwen2vl" / "synthetic" / "image"
    write_planted_cache(primary, 64, 40, 80)
    _set_a0_query(primary, "last")
    r = train(root, tmp_path / "run", "trainer.max_epochs=1")
    assert load_compressor(r["compressor"]).config.a0_query == "last"
    with pytest.raises(InputError, match=r"compressor.net.a0_query='instruction' but the caches hold A_v\^0 of a0_query='last'"):
        train(root, tmp_path / "run2", "trainer.max_epochs=1", "+compressor.net.a0_query=instruction")
    other = tmp_path / "other"
    write_planted_cache(other, 64, 40, 80, id_prefix="o")  # no a0_query recorded: the paper's instruction rows
    with pytest.raises(InputError, match="caches were built with different relevance.a0_query: last .*, instruction"):
        train(root, tmp_path / "run3", "trainer.max_epochs=1", f"extra_cache_dirs=[{other}]")
    with pytest.raises(InputError, match="reads A_v\\^0 of a0_query='last', but the caches hold a0_query='instruction'"):
        train(root, tmp_path / "run4", "validate_only=true", f"ckpt_path={r['best_checkpoint']}", f"+eval_cache={other}")


def test_resume_continues(cache_root, four_epochs, tmp_path):
    first = train(cache_root, tmp_path / "a", "trainer.max_epochs=2")
    steps_per_epoch = first["global_step"] // 2
    resumed = train(cache_root, tmp_path / "b", "trainer.max_epochs=4", f"ckpt_path={first['last_checkpoint']}")
    assert resumed["global_step"] == 4 * steps_per_epoch == four_epochs["global_step"]
    # same data order, optimizer state and weights: the same model as training 4 epochs straight
    assert resumed["metrics"]["val/kl"] == pytest.approx(four_epochs["metrics"]["val/kl"], rel=1e-4, abs=1e-6)
    lines = Path(resumed["metrics_csv"]).read_text().splitlines()
    header = lines[0].split(",")
    epochs = {int(float(row.split(",")[header.index("epoch")])) for row in lines[1:]}
    assert epochs == {2, 3}


def test_validate_on_longer_sequences(cache_root, four_epochs, tmp_path):
    longer = tmp_path / "longer"
    write_planted_cache(longer, 40, 200, 300, seed=7, data="synthetic_long")
    r = train(
        cache_root, tmp_path / "v", "validate_only=true", f"ckpt_path={four_epochs['best_checkpoint']}", f"+eval_cache={longer}"
    )
    assert r["val_samples"] == 40 and r["val_lengths"][0] >= 200
    assert set(r["metrics"]) >= {"val/kl", "val/recall@10", "val/recall@25", "val/recall@50"}
    assert r["metrics"]["val/kl"] < r["baselines"]["val/baseline/a0_kl"]  # generalises to longer inputs


# ----------------------------------------------------------------------------- CLI (subprocess)


def cli(*args: str, env_extra: dict | None = None, wait: bool = True):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.update(env_extra or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "explain_prune.train", *(pinned(args) if "--cfg" not in args else args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc.communicate(timeout=300) + (proc.returncode,) if wait else proc


def test_cfg_job_prints_config():
    out, err, rc = cli("--cfg", "job", "model=tiny_qwen2vl")
    assert rc == 0, err
    assert "compressor:" in out and "channels:" in out and "cache_dir:" in out


def test_multirun_sweep_over_learning_rates(cache_root, tmp_path):
    sweep = tmp_path / "sweep"
    out, err, rc = cli(
        "-m",
        "compressor.lr=1e-2,3e-2",
        "trainer.max_epochs=1",
        f"paths.cache_root={cache_root}",
        f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
        *FAST[:4],
    )
    assert rc == 0, err[-2000:]
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert [r["config"]["lr"] for r in results] == [0.01, 0.03]
    assert all(Path(r["compressor"]).is_file() for r in results)


def _nan_cache(directory: Path) -> None:
    meta = make_meta("tiny_qwen2vl", "synthetic", "image")
    with CacheWriter(directory, meta) as w:
        for i in range(4):
            w.add(f"x{i}", torch.rand(10) + 0.1, torch.rand(10))
    index_path = directory / "index-part000of001.jsonl"
    entries = [json.loads(x) for x in index_path.read_text().splitlines()]
    shard = directory / entries[2]["shard"]
    tensors = load_file(str(shard))
    tensors["a0"][entries[2]["offset"] + 3] = float("nan")
    save_file(tensors, str(shard))
    digest = hashlib.sha256(shard.read_bytes()).hexdigest()
    for e in entries:
        e["shard_bytes"], e["shard_sha256"] = shard.stat().st_size, digest
    index_path.write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_bad_inputs_fail_with_one_line(tmp_path):
    sub = "tiny_qwen2vl/synthetic/image"
    roots = {name: tmp_path / name for name in ("missing", "other_model", "empty", "nan", "all_wrong")}
    with CacheWriter(roots["other_model"] / sub, make_meta("qwen2vl", "synthetic", "image")) as w:
        w.add("a", torch.rand(5), torch.rand(5))
    (roots["empty"] / sub).mkdir(parents=True)  # a meta.json and no sample (a writer alone leaves no meta.json)
    write_json_atomic(roots["empty"] / sub / "meta.json", make_meta("tiny_qwen2vl", "synthetic", "image"))
    _nan_cache(roots["nan"] / sub)
    write_planted_cache(roots["all_wrong"] / sub, 6, 10, 20, correct_every=1)
    expected = {
        "missing": "build it with: python -m explain_prune.generate model=tiny_qwen2vl data=synthetic modality=image",
        "other_model": "model='qwen2vl' but model='tiny_qwen2vl' was asked",
        "empty": "cache is empty",
        "nan": "non-finite value (nan) in a0 of sample 'x2'",
        "all_wrong": f"cache {roots['all_wrong'] / sub}: all 6 samples were answered incorrectly",
    }
    procs = {
        name: cli(f"paths.cache_root={root}", f"paths.log_dir={tmp_path / 'out'}", *FAST[:2], wait=False)
        for name, root in roots.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err)
        assert "Traceback" not in err, (name, err)
        error_lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1, (name, err)
        assert expected[name] in error_lines[0], (name, error_lines[0])


def test_default_builds_the_synthetic_cache_then_trains(tmp_path):
    """The README main job: with no cache, train answers synthetic questions with the shipped
    model, caches (A_v^0, R_v), then trains (here 24 samples and 2 epochs to stay fast)."""
    out, err, rc = cli(
        "model=synthetic",
        "data.auto_generate=true",
        "data.limit=24",
        "trainer.max_epochs=2",
        f"paths.cache_root={tmp_path / 'cache'}",
        f"paths.log_dir={tmp_path}",
        *FAST[:4],
    )
    assert rc == 0, err[-2000:]
    assert "no relevance cache yet: building" in out and "cached 24" in out
    assert (tmp_path / "cache" / "synthetic" / "synthetic" / "image" / "meta.json").is_file()
    assert "compressor:" in out and "val/kl=" in out


def test_auto_generated_cache_is_completed_not_reused_short(tmp_path):
    """An interrupted build or a smaller earlier data.limit leaves the cache short: the next run
    resumes generation (skipping cached ids) and trains on the whole requested set."""
    common = ["model=synthetic", "data.auto_generate=true", "trainer.max_epochs=1",
              f"paths.cache_root={tmp_path / 'cache'}", f"paths.log_dir={tmp_path}", *FAST[:4]]
    sizes = []
    for limit, expected in ((12, "cached 12 "), (20, "cached 8 ")):
        out, err, rc = cli(*common, f"data.limit={limit}")
        assert rc == 0, err[-2000:]
        assert expected in out, out
        results = json.loads(Path(out.split("results json: ")[1].split()[0]).read_text())
        sizes.append(results["train_samples"] + results["val_samples"])
    assert "completing" in out and "already cached 12" in out
    assert sizes[1] > sizes[0], sizes


# ----------------------------------------------------------------------------- resume faults


def test_resume_below_the_checkpoints_epoch_stops_before_any_cache_is_read(four_epochs, tmp_path):
    """Lightning would only refuse this once training starts (after a cache build); here it is one line first."""
    last = four_epochs["last_checkpoint"]
    epoch = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert epoch >= 2
    with pytest.raises(InputError, match=rf"^trainer.max_epochs={epoch} but ckpt_path {last} was saved in epoch {epoch}: "
                                         rf"set trainer.max_epochs above {epoch} to train further$"):
        train(tmp_path / "no_cache_here", tmp_path / "out", f"trainer.max_epochs={epoch}", f"ckpt_path={last}")


def test_resume_refuses_another_a0_query_or_architecture(cache_root, four_epochs, tmp_path):
    last = four_epochs["last_checkpoint"]
    with pytest.raises(InputError, match=r"holds an f_θ with other compressor.net settings \(channels\)"):
        train(cache_root, tmp_path / "a", "trainer.max_epochs=5", f"ckpt_path={last}", "compressor.net.channels=[8,8]")
    root = tmp_path / "cache"
    primary = root / "tiny_qwen2vl" / "synthetic" / "image"
    write_planted_cache(primary, 64, 40, 80)
    _set_a0_query(primary, "last")
    with pytest.raises(InputError, match="reads A_v\\^0 of a0_query='instruction', but the caches hold a0_query='last'"):
        train(root, tmp_path / "b", "trainer.max_epochs=5", f"ckpt_path={last}")


def test_resume_in_the_same_output_dir_keeps_the_logged_history(cache_root, tmp_path):
    out = tmp_path / "run"
    first = train(cache_root, out, "trainer.max_epochs=2")
    before = Path(first["metrics_csv"]).read_bytes()
    resumed = train(cache_root, out, "trainer.max_epochs=3", f"ckpt_path={first['last_checkpoint']}")
    assert Path(first["metrics_csv"]).read_bytes() == before  # nothing logged is lost
    assert resumed["metrics_csv"] == str(out / "csv" / "resume1" / "metrics.csv")
    assert resumed["metrics_csv_history"] == [first["metrics_csv"], resumed["metrics_csv"]]
    lines = Path(resumed["metrics_csv"]).read_text().splitlines()
    header = lines[0].split(",")
    assert {int(float(row.split(",")[header.index("epoch")])) for row in lines[1:]} == {2}
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics_csv_history"] == resumed["metrics_csv_history"]


def test_outputs_get_the_umask_mode(four_epochs):
    from explain_prune.core import default_file_mode

    made = [four_epochs[key] for key in ("best_checkpoint", "last_checkpoint", "compressor", "metrics_csv", "results_json")]
    assert {Path(p).name: oct(Path(p).stat().st_mode & 0o777) for p in made} == {Path(p).name: oct(default_file_mode()) for p in made}


def test_compressor_variants_train_on_the_caches_features(tmp_path):
    """compressor=heads reads the cached per-head A_v^0 (width set from the cache), compressor=kvnorm
    A_v^0 + the key/value norms; a cache without those features is refused with one line."""
    root = tmp_path / "cache"
    write_planted_cache(root / "tiny_qwen2vl" / "synthetic" / "image", 96, 40, 80, features=True)
    for variant, inputs, width in (("heads", ["a0_heads"], 2), ("kvnorm", ["a0", "kv_norm"], 3)):
        r = train(root, tmp_path / variant, "trainer.max_epochs=1", f"compressor={variant}")
        net = load_compressor(r["compressor"])
        assert net.config.inputs == inputs and net.config.in_channels == width
        assert net.blocks[0].depthwise.in_channels == width
        assert r["metrics"]["val/kl"] < r["baselines"]["val/baseline/uniform_kl"]
    bare = tmp_path / "bare"
    write_planted_cache(bare / "tiny_qwen2vl" / "synthetic" / "image", 32, 40, 80)
    with pytest.raises(InputError, match="holds no per-token feature 'a0_heads'.*regenerate"):
        train(bare, tmp_path / "bare_run", "trainer.max_epochs=1", "compressor=heads")
