"""Eq. 1 relevance and A_v^0 against independent references, on every tiny family, image and video;
`python -m explain_prune.generate` resumes after SIGKILL to the same cache, skips bad samples."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODELS, model_cfg, random_image, write_video
from omegaconf import OmegaConf

from explain_prune.core import InputError
from explain_prune.data.cache import CacheReader
from explain_prune.data.sources import build_source
from explain_prune.engine import generate
from explain_prune.explain import first_layer_attention, relevance
from explain_prune.explain.reference import naive_relevance
from explain_prune.models import Sample, build_vlm

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def tiny(name: str, dtype: str = "float64", attn: str = "sdpa"):
    return build_vlm(model_cfg(name, dtype=dtype, attn_implementation=attn))


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", num_frames=6)


def prompts(vlm, video_file):
    image = vlm.prepare(Sample(id="i", question="What color is the object ?", images=[random_image(3, 112, 140)]))
    video = vlm.prepare(Sample(id="v", question="What happens in the video ?", video=video_file))
    return [image, video]


def answer_of(vlm, prompt, n=5):
    tokens = generate(vlm, prompt, None, max_new_tokens=n).tokens
    return tokens or [int(vlm.decoder.embed_tokens.num_embeddings) - 1]


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("head_reduce", ["grad", "mean"])
def test_relevance_equals_naive_reference(name, head_reduce, video_file):
    vlm = tiny(name)
    for prompt in prompts(vlm, video_file):
        answer = answer_of(vlm, prompt)
        reference = naive_relevance(vlm, prompt, answer, head_reduce=head_reduce)
        scale = reference.abs().max()
        assert scale > 0 and reference.shape == (prompt.num_visual,)
        for batch_tokens, head_block in ((1, 4), (1, 1), (3, 3)):  # 3 heads: a block that splits a GQA group
            fast = relevance(vlm, prompt, answer, head_reduce=head_reduce, batch_tokens=batch_tokens, head_block=head_block)
            assert float((fast - reference).abs().max() / scale) <= 1e-5


def test_clamp_switch_matters():
    vlm = tiny("tiny_qwen2vl")
    prompt = vlm.prepare(Sample(id="i", question="What color is the object ?", images=[random_image(3)]))
    answer = answer_of(vlm, prompt)
    clamped, raw = relevance(vlm, prompt, answer, clamp=True), relevance(vlm, prompt, answer, clamp=False)
    torch.testing.assert_close(raw, naive_relevance(vlm, prompt, answer, clamp=False), atol=1e-7, rtol=1e-5)
    assert not torch.allclose(clamped, raw)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_relevance_is_causal(name):
    """A token's relevance row depends only on the answer up to it: changing later answer tokens
    (their own logit paths) changes nothing for the earlier ones — and does change their own rows."""
    vlm = tiny(name)
    prompt = vlm.prepare(Sample(id="i", question="What color is the object ?", images=[random_image(5)]))
    answer = [31, 41, 59, 26, 53]
    altered = answer[:2] + [97, 93, 23]
    rows = relevance(vlm, prompt, answer, per_token=True)
    rows_altered = relevance(vlm, prompt, altered, per_token=True)
    # tokens 0 and 1 (inputs and targets unchanged) keep their rows exactly; from token 2 on the
    # target logit itself changed, so its row must change
    torch.testing.assert_close(rows[:2], rows_altered[:2], atol=1e-12, rtol=0)
    assert not torch.allclose(rows[2], rows_altered[2])


@pytest.mark.parametrize("query", ["instruction", "last"])
@pytest.mark.parametrize("name", TINY_MODELS)
def test_first_layer_attention_equals_eager_map_with_sdpa_model(name, query, video_file):
    vlm = tiny(name, "float32", "sdpa")
    for prompt in prompts(vlm, video_file):
        ours = first_layer_attention(vlm, prompt, query)  # the model stays in sdpa mode here
        with vlm.attention_implementation("eager"), torch.no_grad():
            out = vlm.model(inputs_embeds=prompt.inputs_embeds, position_ids=prompt.position_ids, output_attentions=True)
        rows = prompt.instruction_index if query == "instruction" else [prompt.length - 1]
        eager = out.attentions[0][0][:, rows][:, :, prompt.visual_index].mean(dim=(0, 1))
        assert ours.shape == (prompt.num_visual,)
        assert float((ours - eager).abs().max()) <= 1e-6
        assert vlm.model.config._attn_implementation == "sdpa"


def test_unknown_a0_query_is_named():
    vlm = tiny("tiny_qwen2vl", "float32", "sdpa")
    prompt = vlm.prepare(Sample(id="i", question="What color ?", images=[random_image(3, 56, 56)]))
    with pytest.raises(InputError, match="A_v\\^0 query 'first' unknown \\(known: instruction, last\\)"):
        first_layer_attention(vlm, prompt, "first")


# --- the generate entry point --------------------------------------------------------------------


def generate_cmd(cache_root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "explain_prune.generate", "model=tiny_qwen2vl", "data=synthetic",
            f"paths.cache_root={cache_root}", f"hydra.run.dir={cache_root}/run", "shard_size=3", *extra]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def cache_contents(directory: Path) -> dict:
    reader = CacheReader([directory])
    return {s.id: (s.a0.tolist(), s.rv.tolist(), s.correct, s.answer) for s in reader}


@pytest.mark.parametrize("query", ["instruction", "last"])
def test_cache_holds_the_a0_of_its_query_and_records_it(tmp_path, query):
    """generate with relevance.a0_query=<query> caches exactly first_layer_attention(..., query) and
    says so in meta.json, which is what train copies into the f_θ file."""
    cache = tmp_path / "cache"
    proc = subprocess.run(generate_cmd(tmp_path, "data.limit=3", f"relevance.a0_query={query}", f"cache_dir={cache}"),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["config"]["relevance"]["a0_query"] == query
    vlm = build_vlm(model_cfg("tiny_qwen2vl"))
    data = OmegaConf.load(ROOT / "conf" / "data" / "synthetic.yaml")
    data.limit = 3
    source = build_source(data)
    cached = {s.id: s.a0 for s in CacheReader([cache])}
    assert len(cached) == 3
    for sample in source:
        expected = first_layer_attention(vlm, vlm.prepare(sample), query)
        assert torch.allclose(cached[sample.id], expected.float(), rtol=1e-6, atol=1e-9)


def test_generate_resumes_after_sigkill(tmp_path):
    full = tmp_path / "full"
    done = subprocess.run(generate_cmd(full, "data.limit=18"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = cache_contents(full / "tiny_qwen2vl" / "synthetic" / "image")
    assert len(expected) == 18

    killed = tmp_path / "killed"
    index = killed / "tiny_qwen2vl" / "synthetic" / "image" / "index-part000of001.jsonl"
    proc = subprocess.Popen(generate_cmd(killed, "data.limit=18"), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (index.is_file() and index.read_text().count("\n") >= 3):
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = index.read_text().count("\n")
    assert 3 <= partial < 18
    rerun = subprocess.run(generate_cmd(killed, "data.limit=18"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"already cached {partial}" in rerun.stdout
    assert cache_contents(killed / "tiny_qwen2vl" / "synthetic" / "image") == expected


def test_generate_shards_are_disjoint_and_complete(tmp_path):
    for shard in (0, 1):
        proc = subprocess.run(generate_cmd(tmp_path, "data.limit=8", f"shard_id={shard}", "num_shards=2"),
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    merged = CacheReader([tmp_path / "tiny_qwen2vl" / "synthetic" / "image"])
    ids = [s.id for s in merged]
    assert len(ids) == len(set(ids)) == 8


def test_generate_skips_bad_samples_or_fails_when_strict(tmp_path):
    # an Infinity-MM-format annotation with one good row and one whose image file is missing
    bad = tmp_path / "ann.json"
    image = tmp_path / "img.png"
    random_image(0).save(image)
    bad.write_text(
        '[{"id": "ok", "image": "img.png", "conversations": [{"from": "human", "value": "<image>\\nWhat color ?"},'
        ' {"from": "gpt", "value": "red"}]},'
        ' {"id": "missing", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\\nWhat ?"},'
        ' {"from": "gpt", "value": "red"}]}]'
    )
    base = generate_cmd(tmp_path / "c", "data=infinity_mm", f"data.root={tmp_path}", f"data.annotation={bad}")
    lenient = subprocess.run(base, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert lenient.returncode == 0, lenient.stderr[-2000:]
    assert "cached 1" in lenient.stdout and "skipped 1" in lenient.stdout
    strict = subprocess.run([*base, "data.strict=true", f"paths.cache_root={tmp_path}/d"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert strict.returncode != 0
    assert "missing" in strict.stderr and "Traceback" not in strict.stderr
