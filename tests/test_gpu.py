"""The exactness guarantees on the accelerator (`pytest -m gpu`, run by scripts/gpu_check.sh).

The device is `EXPLAIN_PRUNE_TEST_DEVICE`, else cuda when available, else cpu — so these tests run
everywhere, and on a GPU machine they check the CUDA paths: the engine equals HF `generate` token for
token, removal equals masking (also FastVID and PruneVid with its cache eviction on a video), relevance
equals the naive reference (float32), and an evaluate job on
the synthetic benchmark gives the same accuracy as on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import ROOT, TINY_MODELS, model_cfg, random_image
from omegaconf import OmegaConf

from explain_prune.core import Sample
from explain_prune.engine import PrunePlan, generate
from explain_prune.explain import relevance
from explain_prune.explain.reference import naive_relevance
from explain_prune.models import build_vlm

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("EXPLAIN_PRUNE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module", params=TINY_MODELS)
def vlm(request):
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 for the exactness checks
    torch.backends.cudnn.allow_tf32 = False
    return build_vlm(model_cfg(request.param, device=DEVICE, dtype="float32"))


def image_prompt(vlm, seed: int = 0):
    return vlm.prepare(Sample(id=f"s{seed}", question="What color is the object ?", images=[random_image(seed, 112, 140)]))


def every_other(view):
    return view.visual_index[::2][: view.budget(0.5)]


def test_the_model_is_on_the_test_device(vlm):
    assert vlm.device.type == torch.device(DEVICE).type
    assert image_prompt(vlm).inputs_embeds.device.type == vlm.device.type


def test_engine_equals_hf_generate_token_for_token(vlm):
    prompt = image_prompt(vlm)
    ours = generate(vlm, prompt, None, max_new_tokens=8).tokens
    reference = [int(t) for t in vlm.generate_reference(prompt, 8).tolist()]
    eos = set(vlm.eos_token_ids)
    assert ours == [t for t in reference[: len(ours) + 1] if t not in eos][: len(ours)]
    assert len(ours) == len(reference) or reference[len(ours)] in eos


def test_removal_equals_masking(vlm):
    prompts = [image_prompt(vlm, 1), image_prompt(vlm, 2)]
    plan = PrunePlan(selectors={1: every_other})
    removed = generate(vlm, prompts, plan, max_new_tokens=4, mode="remove", return_logits=True)
    masked = generate(vlm, prompts, plan, max_new_tokens=4, mode="mask", return_logits=True)
    for a, b in zip(removed, masked):
        assert a.tokens == b.tokens and a.kept_per_layer == b.kept_per_layer
        assert torch.allclose(a.step_logits, b.step_logits, rtol=1e-4, atol=1e-4)


def test_video_methods_removal_equals_masking(vlm):
    """FastVID's merge before the LLM and PruneVid's stage-2 drop with the earlier caches evicted, on the device."""
    from explain_prune.methods import build_method

    prompt = vlm.prepare(Sample(id="v", question="What happens ?", video=[random_image(20 + i, 112, 112) for i in range(8)]))
    for method in (build_method("fastvid", 0.5), build_method("prunevid", 0.4, layer=1, merge_above=2)):
        removed = generate(vlm, prompt, method, max_new_tokens=4, mode="remove", return_logits=True)
        masked = generate(vlm, prompt, method, max_new_tokens=4, mode="mask", return_logits=True)
        assert removed.tokens == masked.tokens and removed.kept_per_layer == masked.kept_per_layer
        assert torch.allclose(removed.step_logits, masked.step_logits, rtol=1e-4, atol=1e-4)


def test_relevance_equals_the_naive_reference(vlm):
    prompt = image_prompt(vlm, 3)
    answer = generate(vlm, prompt, None, max_new_tokens=4).tokens or [5]
    reference = naive_relevance(vlm, prompt, answer)
    fast = relevance(vlm, prompt, answer, head_block=3)
    assert float((fast - reference.cpu()).abs().max() / reference.abs().max()) <= 1e-5


def test_evaluate_gives_the_cpu_accuracy(tmp_path):
    from explain_prune.benchmarks.synthetic import SyntheticBenchmark
    from explain_prune.methods import build_method
    from explain_prune.stages.evaluate import EvalSettings, evaluate
    from explain_prune.synthetic import register_resolvers

    register_resolvers()
    cfg = OmegaConf.load(ROOT / "conf/model/synthetic.yaml")
    scores = {}
    for device in ("cpu", DEVICE):
        vlm = build_vlm(OmegaConf.merge(cfg, {"device": device}))
        out = evaluate(vlm, SyntheticBenchmark(limit=8), build_method("fastv", 0.25), tmp_path / device.replace(":", "_"),
                       EvalSettings(batch_size=4), cfg.llm)
        scores[device] = out["score"]["overall"]
    assert scores["cpu"] == scores[DEVICE]
