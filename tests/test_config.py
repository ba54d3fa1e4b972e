"""Every config group's bad values stop at config time: one `error: <key>: ...` line, exit 2, no model load.

The bulk of the cases compose each stage's config with the compose API and run `check_config` (what
`cli.task` runs first); a few run the real entry points, in-process with the model builder replaced by
one that fails the test, and as a subprocess, to see the line and the exit code a user sees.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import explain_prune.cli  # noqa: F401  (registers the ${ep.asset:...} resolver the synthetic model config uses)
from explain_prune.config import check_config
from explain_prune.core import InputError

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
CUDA = torch.cuda.is_available()  # the real no-CUDA refusal runs as a subprocess where there is none


def composed(stage: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=stage, overrides=list(overrides))


# (stage, overrides, the start of the one-line message)
BAD = [
    # model
    ("evaluate", ["model.dtype=float8"], "model.dtype: 'float8' is not allowed (allowed: auto, float64, float32, bfloat16, float16)"),
    ("evaluate", ["model.device=mps"], "model.device: 'mps' is not supported (allowed: auto, cpu, cuda or cuda:N)"),
    ("evaluate", ["model.device=gpu0"], "model.device: 'gpu0' is not a device (allowed: auto, cpu, cuda or cuda:N)"),
    ("evaluate", ["model=vila15", "model.conversation=vicuna"], "model.conversation: 'vicuna' is not allowed (allowed: llama_3, llama_3_vila1.5)"),
    ("evaluate", ["+model.conversation=llama_3"], "model.conversation: only the vila family reads it"),
    ("generate", ["model.attn_implementation=flash_attention_2"], "model.attn_implementation: flash_attention_2 is not supported"),
    ("evaluate", ["model.attn_implementation=flash"], "model.attn_implementation: 'flash' is not allowed"),
    ("evaluate", ["+model.dtpye=float32"], "model.dtpye: unknown key"),
    ("evaluate", ["model.trust_remote_code=yes"], "model.trust_remote_code: expected bool, got 'yes'"),
    ("evaluate", ["model.family=llama"], "model.family: 'llama' is not allowed (allowed: qwen2vl, llava_onevision, vila)"),
    ("evaluate", ["model.video.num_frames=0"], "model.video.num_frames: must be >= 1"),
    ("evaluate", ["model.video.sampling=uniform"], "model.video.sampling: 'uniform' is not allowed"),
    ("evaluate", ["model.image.max_pixels=abc"], "model.image.max_pixels: expected int | null, got 'abc'"),
    # modality
    ("evaluate", ["modality=video", "modality.num_frames=-1"], "modality.num_frames: must be >= 1"),
    ("evaluate", ["+modality.frames=8"], "modality.frames: unknown key"),
    # method (options, retention, the method's own range checks)
    ("evaluate", ["method=fastv", "method.options.layer=abc"], "method.options.layer: expected int, got 'abc'"),
    ("evaluate", ["method=fastv", "+method.options.K=2"], "method.options.K: unknown key (allowed: count_rule, layer, query)"),
    ("evaluate", ["method=fastv", "method.options.query=first"], "method.options.query: 'first' is not allowed (allowed: last, mean)"),
    ("evaluate", ["method=gae", "method.options.head_reduce=grd"], "method.options.head_reduce: 'grd' is not allowed"),
    ("evaluate", ["method=fastv", "method.retention=1.5"], "method.retention: must be in (0, 1], got 1.5"),
    ("evaluate", ["method=fastv", "method.retention=abc"], "method.retention: must be a number in (0, 1], got 'abc'"),
    ("evaluate", ["method=vanilla", "retention=r0.25"], "method (vanilla): method 'vanilla' keeps every visual token"),
    ("evaluate", ["method=pdrop", "method.options.lam=2.0"], "method (pdrop): pdrop: lam must be in (0, 1]"),
    ("evaluate", ["method=pdrop", "method.options.count_rule=floor"], "method.options.count_rule: 'floor' is not allowed (allowed: round, int)"),
    ("evaluate", ["method=pdrop", "method.options.schedule=fitted"], "method.options.schedule: 'fitted' is not allowed (allowed: paper, solved)"),
    ("evaluate", ["method=pdrop", "method.options.renumber_positions=yes"], "method.options.renumber_positions: 'yes' is not allowed"),
    ("evaluate", ["method=dart", "method.options.pivot_order=random"], "method.options.pivot_order: 'random' is not allowed (allowed: official, sorted)"),
    ("evaluate", ["method=dart", "method.options.topk_from=ratio"], "method.options.topk_from: 'ratio' is not allowed"),
    ("evaluate", ["method=fastv", "method.options.count_rule=ceil"], "method.options.count_rule: 'ceil' is not allowed"),
    ("evaluate", ["benchmark=pope", "benchmark.llm_matcher=true"], "benchmark.llm_matcher=true asks the judge to read the answers"),
    # benchmark
    ("evaluate", ["benchmark.limit=abc"], "benchmark.limit: expected int | null, got 'abc'"),
    ("evaluate", ["+benchmark.limt=3"], "benchmark.limt: unknown key"),
    ("evaluate", ["benchmark.generator=3"], "benchmark.generator: expected Mapping | null, got 3"),
    # judge
    ("evaluate", ["judge=fake", "+judge.temperature=0"], "judge.temperature: unknown key (allowed: model)"),
    ("evaluate", ["judge=openai_compatible", "judge.timeout=soon"], "judge.timeout: expected float, got 'soon'"),
    ("evaluate", ["+judge.model=x"], "judge.model: unknown key (allowed: none)"),
    # evaluate's own settings
    ("evaluate", ["batch_size=0"], "batch_size: must be >= 1, got 0"),
    ("evaluate", ["batch_size=-1"], "batch_size: must be >= 1, got -1"),
    ("evaluate", ["batch_size=abc"], "batch_size: expected int, got 'abc'"),
    ("evaluate", ["strict=maybe"], "strict: expected bool, got 'maybe'"),
    ("evaluate", ["max_new_tokens=0"], "max_new_tokens: must be >= 1, got 0"),
    ("evaluate", ["torch_threads=0"], "torch_threads: must be >= 1, got 0"),
    # generate: relevance, data, sharding
    ("generate", ["relevance.head_reduce=grd"], "relevance.head_reduce: 'grd' is not allowed (allowed: grad, mean)"),
    ("generate", ["relevance.a0_query=first"], "relevance.a0_query: 'first' is not allowed (allowed: instruction, last)"),
    ("generate", ["relevance.batch_tokens=0"], "relevance.batch_tokens: must be >= 1, got 0"),
    ("generate", ["relevance.clamp=sometimes"], "relevance.clamp: expected bool, got 'sometimes'"),
    ("generate", ["+relevance.heads=mean"], "relevance.heads: unknown key"),
    ("generate", ["data.limit=abc"], "data.limit: expected int | null, got 'abc'"),
    ("generate", ["+data.root=/tmp"], "data.root: unknown key"),
    ("generate", ["data.source=laion"], "unknown data source 'laion' (allowed: infinity_mm, llava_video, synthetic)"),
    ("generate", ["num_shards=0"], "num_shards: must be >= 1, got 0"),
    ("generate", ["shard_id=-1"], "shard_id: must be >= 0, got -1"),
    # train: compressor
    ("train", ["compressor.net.activation=swish"], "compressor.net.activation: 'swish' is not allowed"),
    ("train", ["compressor.net.input_norm=l2"], "compressor.net.input_norm: 'l2' is not allowed (allowed: mean, log, zscore, none)"),
    ("train", ["+compressor.net.depth=3"], "compressor.net.depth: unknown key"),
    ("train", ["compressor.lr=fast"], "compressor.lr: expected float, got 'fast'"),
    ("train", ["compressor.lr=-1"], "compressor.lr: must be >= 0, got -1"),
    ("train", ["compressor.mask_ratio=1.5"], "compressor.mask_ratio: must be in [0, 1), got 1.5"),
    ("evaluate", ["method=fastvid"], "method=fastvid defines a rule for video inputs only, not modality=image"),
    ("evaluate", ["method=prunevid", "modality=video", "method.options.tau=2"], "method (prunevid): prunevid: tau must be in [-1, 1]"),
    ("evaluate", ["method=prunevid", "modality=video", "+method.options.K=10"], "method.options.K: unknown key"),
    ("evaluate", ["method=fastvid", "modality=video", "method.options.stprune_d=1.0"], "method (fastvid): fastvid: stprune_d must be in [0, 1)"),
    ("evaluate", ["method=fastvid", "modality=video", "method.options.dtm_p=x"], "method.options.dtm_p: expected int, got 'x'"),
    ("evaluate", ["model=tiny_qwen2vl", "method=prunevid", "modality=video"],
     "method (prunevid) on model=tiny_qwen2vl (3 layers): prunevid: layer=10 must be in 0..1 on a 3-layer model"),
    ("evaluate", ["model=tiny_vila", "method=fastv", "method.options.layer=3"],
     "method (fastv) on model=tiny_vila (3 layers): fastv layer=3 is outside 1..2 for a 3-layer model"),
    ("train", ["+compressor.epochs=3"], "compressor.epochs: unknown key"),
    # flops
    ("flops", ["method=dart", "method.options.pivot_image=x"], "method.options.pivot_image: expected int, got 'x'"),
    ("flops", ["n_visual=-5"], "n_visual: must be >= 1, got -5"),
    # trainer (Lightning's own signature)
    ("train", ["trainer.max_epochs=abc"], "trainer.max_epochs: expected int | null, got 'abc'"),
    ("train", ["trainer.max_epochs=0"], "trainer.max_epochs: must be >= 1, got 0"),
    ("train", ["trainer.precision=bf17"], "trainer.precision: expected 64 | 32 | 16 | 'transformer-engine'"),
    ("train", ["+trainer.max_epoch=3"], "trainer.max_epoch: unknown key (allowed: accelerator, accumulate_grad_batches"),
    # synthetic_fit: its own settings and groups, before the random model is built
    ("synthetic_fit", ["steps=0"], "steps: must be >= 1, got 0"),
    ("synthetic_fit", ["pct_start=1.5"], "pct_start: must be <= 1, got 1.5"),
    ("synthetic_fit", ["target_accuracy=1.2"], "target_accuracy: must be <= 1, got 1.2"),
    ("synthetic_fit", ["threads=two"], "threads: expected int, got 'two'"),
    ("synthetic_fit", ["curriculum.threshold=2"], "curriculum.threshold: must be <= 1, got 2"),
    ("synthetic_fit", ["curriculum.start=4", "curriculum.stop=3"], "curriculum.stop: must be >= curriculum.start (4), got 3"),
    ("synthetic_fit", ["+curriculum.current=2"], "curriculum.current: unknown key (allowed: min_steps, start, stop, threshold, window)"),
    ("synthetic_fit", ["training.streams.small.batch_size=0"], "training.streams.small.batch_size: must be >= 1, got 0"),
    ("synthetic_fit", ["training.cycle=[small,big]"], "training.cycle: must name streams in ['large', 'small'], got ['small', 'big']"),
    ("synthetic_fit", ["+training.streams.small.config.gridd=3"], "training.streams.small.config: unknown generator option(s) ['gridd']"),
    ("synthetic_fit", ["training.val.grid=0"], "training.val: "),
    ("synthetic_fit", ["heldout.test.ablation_n=1000"], "heldout.test.ablation_n: must be <= heldout.test.n (512), got 1000"),
    ("synthetic_fit", ["heldout.video_8f.n=0"], "heldout.video_8f.n: must be >= 1, got 0"),
]


@pytest.mark.parametrize(("stage", "overrides", "message"), BAD, ids=[" ".join(o) for _, o, _ in BAD])
def test_bad_value_is_one_line_naming_the_key(stage, overrides, message):
    cfg = composed(stage, *overrides)
    with pytest.raises(InputError) as err:
        check_config(cfg)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(message), text


@pytest.mark.parametrize("stage", ["evaluate", "generate", "train", "flops", "visualize", "synthetic_fit"])
def test_defaults_pass(stage):
    check_config(composed(stage))


@pytest.mark.parametrize("overrides", [
    ["baseline=fastv"], ["baseline=pdrop", "retention=r0.51"], ["method=dart", "retention=r0.1"],
    ["method=visionzip", "method.retention=0.3"], ["judge=fake"], ["model=qwen2vl"], ["model=vila15", "modality=video"],
    ["method=fastvid", "modality=video"], ["baseline=prunevid", "modality=video", "model=llava_ov"],
])
def test_good_values_pass(overrides):
    check_config(composed("evaluate", *overrides))


def test_entry_point_stops_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """In-process evaluate: the bad key is reported and the model builder is never called."""
    from explain_prune import evaluate

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(evaluate, "build_vlm", no_model)
    monkeypatch.setattr(sys, "argv", ["evaluate", "--config-path", CONF, "batch_size=0", f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: batch_size: must be >= 1, got 0"]
    assert not (tmp_path / "job.json").exists()  # nothing claimed, nothing written


@pytest.mark.parametrize(("device", "available", "count", "line"), [
    ("cuda", False, 0, "model.device=cuda: CUDA is not available here"),
    ("cuda:1", False, 0, "model.device=cuda:1: CUDA is not available here"),
    ("cuda:7", True, 1, "model.device=cuda:7: this machine has 1 CUDA device(s) (cuda:0 .. cuda:0)"),
])
def test_a_device_this_machine_lacks_is_refused_at_config_time(monkeypatch, device, available, count, line):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(InputError) as err:
        check_config(composed("evaluate", f"model.device={device}"))
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


@pytest.mark.parametrize(("device", "dtype", "expect"), [("auto", "auto", ("cpu", "torch.float32")), ("cpu", "float64", ("cpu", "torch.float64"))])
def test_the_model_is_placed_on_its_device_and_dtype(device, dtype, expect):
    from explain_prune.models import build_vlm

    cfg = composed("evaluate", "model=tiny_qwen2vl", f"model.device={device}", f"model.dtype={dtype}").model
    vlm = build_vlm(cfg)
    assert (vlm.device.type, str(vlm.dtype)) == expect


def test_ours_without_f_theta_stops_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from explain_prune import evaluate

    monkeypatch.setattr(evaluate, "build_vlm", lambda *a, **k: pytest.fail("model built"))
    monkeypatch.setattr(sys, "argv", ["evaluate", "--config-path", CONF, "method=ours", f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: method 'ours' needs a trained f_θ: set method.options.checkpoint=<path.safetensors>"
    ]


@pytest.mark.parametrize(("module", "override", "line"), [
    ("explain_prune.generate", "relevance.head_reduce=grd", "error: relevance.head_reduce: 'grd' is not allowed (allowed: grad, mean)"),
    ("explain_prune.train", "compressor.net.activation=swish", "error: compressor.net.activation: 'swish' is not allowed"),
    *([] if CUDA else [("explain_prune.generate", "model.device=cuda", "error: model.device=cuda: CUDA is not available here")]),
])
def test_subprocess_one_line_exit_2(tmp_path, module, override, line):
    proc = subprocess.run(
        [sys.executable, "-m", module, override, f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(line), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "cache").exists()  # generate wrote no cache meta before failing


def test_baseline_is_the_method_and_refuses_non_baselines():
    assert composed("evaluate", "baseline=fastv").method == composed("evaluate", "method=fastv").method
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException):
        composed("evaluate", "baseline=ours")


@pytest.mark.parametrize("method", ["vanilla", "random", "gae", "fastv", "pdrop", "dart", "visionzip", "ours", "fastvid", "prunevid"])
def test_evaluate_prunes_at_the_methods_default(method):
    """No top-level retention overrides the method's: `method=<m>` runs at conf/method/<m>.yaml's value."""
    from omegaconf import OmegaConf

    cfg = composed("evaluate", f"method={method}")
    own = OmegaConf.load(ROOT / "conf" / "method" / f"{method}.yaml").retention
    assert cfg.method.retention == own
    assert "retention" not in cfg  # one home
    assert cfg.run_id.endswith(f"/{method}/r{own}")
    assert composed("flops", f"method={method}").method.retention == own


@pytest.mark.parametrize("value", ["r0.5", "r0.25", "r0.1", "r0.51"])
def test_retention_group_sets_the_methods_retention(value):
    assert composed("evaluate", "method=fastv", f"retention={value}").method.retention == float(value[1:])


@pytest.mark.parametrize(("override", "line"), [
    ("method=nonexistent", "error: method=nonexistent: no such option (allowed: dart, fastv, fastvid, gae, ours, pdrop, prunevid, random, vanilla, visionzip)"),
    ("baseline=ours", "error: baseline=ours: no such option (allowed: dart, fastv, fastvid, pdrop, prunevid, random, visionzip)"),
])
def test_an_unknown_group_option_is_one_line_and_exit_2(tmp_path, override, line):
    proc = subprocess.run([sys.executable, "-m", "explain_prune.evaluate", override], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [line], proc.stderr


def test_unknown_choice_checks_every_option_of_a_sweep():
    from explain_prune.cli import unknown_choice

    assert unknown_choice(["-m", "retention=r0.5,r0.25", "method=fastv", "model.dtype=float32"]) is None
    assert unknown_choice(["-m", "retention=r0.5,r9"]).startswith("retention=r9: no such option")
    assert unknown_choice(["experiment=table2"]) is None and unknown_choice(["+experiment=nope"]).startswith("experiment=nope")
    assert unknown_choice(["experiment/arm=[vanilla]", "method=choice(fastv,dart)"]) is None  # Hydra's own syntax
    assert unknown_choice(["experiment/arm=nope"]).startswith("experiment/arm=nope: no such option")
