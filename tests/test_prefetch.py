"""The two-stage preparation (`VLM.preprocess` on the host, `VLM.encode` on the device) and the
prefetching loader (data.prefetch): worker processes change nothing that is written.

- the CPU stage pickles without the weights and gives the same host tensors in a copy;
- Qwen2-VL's batched vision tower equals one call per sample;
- the loader keeps stream order with 0, 2 and 3 workers, errors and pass-throughs included, and a
  failing stream is one InputError line;
- evaluate (predictions.jsonl, results.json) and generate (the cache) are identical with 0 and 2
  workers for every tiny family, image and video, and a SIGKILLed evaluate with workers resumes to
  the results of an uninterrupted in-process run.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures import CORRUPT_B64, write_tsv, write_videomme
from helpers import TINY_MODELS, model_cfg, random_image
from omegaconf import OmegaConf

from explain_prune.benchmarks import build_benchmark
from explain_prune.core import DeferredSample, InputError, Sample, SampleError
from explain_prune.data.cache import CacheReader, CacheWriter, make_meta
from explain_prune.data.prefetch import prefetch, resolve_num_workers
from explain_prune.data.sources import build_source
from explain_prune.explain.relevance import RelevanceSettings
from explain_prune.methods import build_method
from explain_prune.models import build_vlm
from explain_prune.stages.evaluate import EvalSettings, evaluate
from explain_prune.stages.generate import collect

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("prefill_seconds", "decode_seconds")


@pytest.fixture(scope="module")
def vlms() -> dict:
    return {name: build_vlm(model_cfg(name)) for name in TINY_MODELS}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("prefetch")
    import base64
    import io

    def b64(seed: int) -> str:
        buf = io.BytesIO()
        random_image(seed, 84, 112).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    rows = [dict(index=i, image=b64(i), question=f"Which option is right {i} ?", A="red", B="green", C="blue", D="cyan",
                 answer="ABCD"[i % 4], category="coarse perception", **{"l2-category": "color"}) for i in range(5)]
    rows.insert(2, dict(index=9, image=CORRUPT_B64, question="Broken ?", A="x", B="y", C="z", D="w", answer="A",
                        category="coarse perception", **{"l2-category": "color"}))
    (base / "mmstar").mkdir()
    write_tsv(base / "mmstar" / "MMStar.tsv", rows)
    write_videomme(base / "videomme")
    return {"mmstar": base / "mmstar", "videomme": base / "videomme"}


def image_sample(seed: int, size: tuple[int, int] = (84, 112)) -> Sample:
    return Sample(id=f"s{seed}", question="What color is it ?", images=[random_image(seed, *size)])


def video_sample(seed: int) -> Sample:
    return Sample(id=f"v{seed}", question="What happens ?", video=[random_image(seed + i, 56, 84) for i in range(4)])


def assert_same_host(a, b) -> None:
    assert (a.sample_id, a.modality, a.visual_grid, a.layout) == (b.sample_id, b.modality, b.visual_grid, b.layout)
    for x, y in ((a.input_ids, b.input_ids), (a.visual_index, b.visual_index), (a.instruction_index, b.instruction_index)):
        assert torch.equal(x, y)
    assert a.pixels.keys() == b.pixels.keys()
    for key in a.pixels:
        assert torch.equal(a.pixels[key], b.pixels[key]), key


# --- the CPU stage ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY_MODELS)
def test_host_stage_pickles_without_the_weights_and_preprocesses_the_same(vlms, name):
    vlm = vlms[name]
    blob = pickle.dumps(vlm.host_stage())
    weights = sum(p.numel() * p.element_size() for p in vlm.parameters())
    assert len(blob) < weights / 4, (len(blob), weights)  # processors and tokenizer, not the model
    stage = pickle.loads(blob)
    for sample in (image_sample(0), video_sample(1)):
        assert_same_host(stage(sample), vlm.preprocess(sample))
    with pytest.raises(AttributeError):  # a preprocess that reached for the model fails here
        stage.adapter.model


def test_qwen2vl_batched_vision_tower_equals_one_call_per_sample(vlms):
    vlm = vlms["tiny_qwen2vl"]
    hosts = [vlm.preprocess(s) for s in (image_sample(0), video_sample(1), image_sample(2, (140, 56)), video_sample(3))]
    batched = vlm.encode_batch(hosts)
    for host, prompt in zip(hosts, batched):
        single = vlm.encode(host)
        assert torch.allclose(prompt.inputs_embeds, single.inputs_embeds, rtol=1e-5, atol=1e-6)
        assert torch.equal(prompt.position_ids, single.position_ids)
        assert torch.equal(prompt.visual_index, single.visual_index)


# --- the loader ----------------------------------------------------------------------------------------


def deferred_read() -> Sample:
    return Sample(id="deferred", question="Which shape ?", images=[random_image(5)])


def stream() -> list:
    """A stream with every kind of item: samples, a counted error, a deferred sample, a bad sample."""
    return [
        image_sample(0),
        SampleError(id="broken", reason="unreadable row"),
        image_sample(1),
        DeferredSample("deferred", deferred_read),
        Sample(id="empty", question="   ", images=[random_image(3)]),
        image_sample(2),
        video_sample(4),
    ]


def skip_s1(sample_id: str) -> str | None:
    return "already logged" if sample_id == "s1" else None


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine, on purpose
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_loader_keeps_stream_order_errors_and_passes(vlms, workers):
    vlm = vlms["tiny_vila"]
    items = list(prefetch(stream, vlm, workers, select=skip_s1))
    assert [i.id for i in items] == ["s0", "broken", "s1", "deferred", "empty", "s2", "v4"]
    assert [i.passed for i in items] == [None, None, "already logged", None, None, None, None]
    assert items[1].error == "unreadable row"
    assert "'empty'" in items[4].error and "empty question" in items[4].error  # raised in a worker, names the sample
    assert items[3].sample.id == "deferred" and items[3].host.sample_id == "deferred"
    readable = [s for s in stream() if isinstance(s, Sample) and s.question.strip() and s.id != "s1"] + [deferred_read()]
    expected = {s.id: vlm.preprocess(s) for s in readable}
    prepared = [item for item in items if item.host is not None]
    assert sorted(i.id for i in prepared) == sorted(expected)
    for item in prepared:
        assert_same_host(item.host, expected[item.id])
    assert items[0].sample.images == [] and items[0].sample.question == "What color is it ?"


def failing_stream():
    yield image_sample(0)
    raise InputError("benchmark mmstar: MMStar.tsv not found under /nowhere")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_stream_is_one_input_error(vlms, workers):
    with pytest.raises(InputError, match=r"^benchmark mmstar: MMStar.tsv not found under /nowhere$"):
        list(prefetch(failing_stream, vlms["tiny_qwen2vl"], workers))


def test_default_worker_count_follows_the_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    assert resolve_num_workers(None) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert resolve_num_workers(None) == 8
    assert resolve_num_workers(0) == 0 and resolve_num_workers(3) == 3


# --- evaluate and generate: identical with workers ---------------------------------------------------


def evaluate_run(name: str, vlm, benchmark: str, root: Path, out: Path, workers: int) -> tuple[list[dict], dict]:
    bench = build_benchmark(name=benchmark, root=str(root))
    dims = OmegaConf.to_container(model_cfg(name).llm, resolve=True)
    results = evaluate(vlm, bench, build_method("fastv", 0.5), out, EvalSettings(batch_size=2, num_workers=workers), dims)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for row in rows:
        for key in TIMING:
            row.pop(key, None)
    for key in TIMING:
        results["efficiency"].pop(key)
    return rows, results


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("benchmark", ["mmstar", "videomme"])
def test_evaluate_is_identical_with_workers(vlms, roots, tmp_path, monkeypatch, name, benchmark):
    vlm = vlms[name]
    monkeypatch.setattr(vlm, "num_frames", 4)
    in_process = evaluate_run(name, vlm, benchmark, roots[benchmark], tmp_path / "w0", 0)
    with_workers = evaluate_run(name, vlm, benchmark, roots[benchmark], tmp_path / "w2", 2)
    assert with_workers == in_process
    rows = in_process[0]
    assert any("error" in r for r in rows) and any("prediction" in r for r in rows)  # both kinds went through


def cache_of(vlm, data: dict, directory: Path, workers: int) -> dict:
    source = build_source(data)
    meta = make_meta(model="m", data="d", modality="image", model_id=None, data_source="synthetic", config={})
    with CacheWriter(directory, meta, shard_size=2) as writer:
        summary = collect(vlm, source.stream, writer, RelevanceSettings(max_new_tokens=3), lambda p, s: None,
                          num_workers=workers)
    assert summary.cached == data["limit"], summary.line()
    return {s.id: (s.a0.tolist(), s.rv.tolist(), s.answer) for s in CacheReader([directory])}


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("frames", [0, 4])
def test_generate_cache_is_identical_with_workers(vlms, tmp_path, name, frames):
    data = {"source": "synthetic", "limit": 3, "seed": 7, "generator": {"frames": frames, "grid": 4}}
    assert cache_of(vlms[name], data, tmp_path / "w2", 2) == cache_of(vlms[name], data, tmp_path / "w0", 0)


def test_killed_evaluate_with_workers_resumes_to_the_in_process_results(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}

    def command(run: Path, workers: int) -> list[str]:
        return [sys.executable, "-m", "explain_prune.evaluate", "benchmark.limit=48",
                "method=fastv", "retention=r0.5", "batch_size=2", f"num_workers={workers}", f"hydra.run.dir={run}"]

    reference = subprocess.run(command(tmp_path / "w0", 0), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = tmp_path / "killed"
    log = killed / "predictions.jsonl"
    proc = subprocess.Popen(command(killed, 2), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (log.is_file() and log.read_text().count("\n") >= 4):
        time.sleep(0.02)
    assert proc.poll() is None, "the job finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 4 <= log.read_text().count("\n") < 48
    rerun = subprocess.run(command(killed, 2), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]

    def settled(run: Path) -> tuple[dict, dict]:
        rows = {}
        for line in (run / "predictions.jsonl").read_text().splitlines():
            row = json.loads(line)
            rows[row["id"]] = {k: v for k, v in row.items() if k not in TIMING}
        results = json.loads((run / "results.json").read_text())
        for key in TIMING:
            results["efficiency"].pop(key)
        return rows, {k: results[k] for k in ("score", "efficiency", "num_samples", "num_errors", "complete")}

    assert settled(killed) == settled(tmp_path / "w0")


# --- frame decoding ------------------------------------------------------------------------------------


def noisy_clip(path: Path, frames: int = 40) -> Path:
    """Lossy H.264 with B-frames (x264 defaults), so a seek lands between key frames."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "28", "g": "16"}
        for _ in range(frames):
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("rule,num_frames", [("linspace", 8), ("interior", 5), ("centers", 7), ("linspace", 60)])
def test_one_seek_per_frame_reads_the_pixels_get_batch_reads(tmp_path, rule, num_frames):
    import decord
    import numpy as np

    from explain_prune.data.video import frame_indices, read_frames

    clip = noisy_clip(tmp_path / "clip.mp4")
    reader = decord.VideoReader(str(clip), num_threads=1)
    expected = reader.get_batch(frame_indices(len(reader), num_frames, rule)).asnumpy()
    frames = read_frames(clip, num_frames, rule)
    assert np.array_equal(np.stack([np.asarray(f) for f in frames]), expected)  # 60 > 40 frames: repeats
