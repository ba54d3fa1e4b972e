"""Device discipline: every tensor the project makes for the model is made on the model's device.

torch's default device is set to `meta` while the model sits on the CPU, so a tensor created without
an explicit device lands on meta, and any torch call that mixes a meta tensor with a real one fails
(checked for every call, since indexing or in-place ops with a meta operand would not fail by themselves).
Host-side work (image processors, tokenizers) runs under `models.base.HOST`, and host-side bookkeeping
(index tensors, counters) is created with `device="cpu"` on purpose.  Covered: prepare, every method's
transform and selectors through the engine on every family, relevance, A_v^0, and one evaluate job.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from helpers import ROOT, TINY_MODELS, model_cfg, random_image, write_video
from omegaconf import OmegaConf

from explain_prune.compress.network import FTheta, FThetaConfig, save_compressor
from explain_prune.core import Sample
from explain_prune.engine import generate
from explain_prune.explain import first_layer_attention, relevance
from explain_prune.methods import METHODS, build_method
from explain_prune.models import build_vlm


class MixedDeviceCheck(TorchFunctionMode):
    """Refuses any torch call whose tensor arguments are partly on meta and partly real."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.is_meta for t in tensors) and not all(t.is_meta for t in tensors):
            raise RuntimeError(f"{getattr(func, '__name__', func)} mixes a tensor made without a device with real ones")
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_default_device():
    torch.set_default_device("meta")
    try:
        with MixedDeviceCheck():
            yield
    finally:
        torch.set_default_device(None)


@functools.lru_cache(maxsize=None)
def tiny(name: str):
    return build_vlm(model_cfg(name, device="cpu"))


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    return str(write_video(tmp_path_factory.mktemp("video") / "clip.mp4"))


@pytest.fixture(scope="module")
def ftheta_path(tmp_path_factory):
    torch.manual_seed(0)
    return save_compressor(tmp_path_factory.mktemp("ftheta") / "f.safetensors", FTheta(FThetaConfig(channels=[4, 8])))


def method_options(name: str, ftheta: str) -> dict:
    """Options that make every selector run on a 3-layer tiny model (defaults otherwise)."""
    return {"ours": {"checkpoint": ftheta}, "fastv": {"layer": 2}, "pdrop": {"layers": [1, 2]}, "dart": {"layer": 2},
            "gae": {"max_new_tokens": 2}, "prunevid": {"layer": 1, "merge_above": 2}}.get(name, {})


def test_the_meta_default_catches_a_tensor_made_without_a_device():
    """The harness itself: mixing, indexing with or moving a device-less tensor fails under it."""
    hidden = torch.zeros(4)
    with meta_default_device():
        for op in (lambda: hidden + torch.ones(4), lambda: hidden[torch.arange(2)],
                   lambda: hidden.clone().masked_fill_(torch.ones(4, dtype=torch.bool), 0.0)):
            with pytest.raises(RuntimeError, match="mixes a tensor made without a device"):
                op()
        with pytest.raises(NotImplementedError, match="meta"):
            torch.arange(2).to(hidden.device)


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_engine_runs_every_method_with_the_default_device_on_meta(name, method, ftheta_path, video_file):
    vlm = tiny(name)
    sample = Sample(id="s", question="What color is the object ?", images=[random_image(1, 112, 140)])
    if "image" not in METHODS.get(method).modalities:  # the video methods
        sample = Sample(id="v", question="What happens ?", video=video_file)
    selector = None if method == "vanilla" else build_method(method, 0.5, **method_options(method, str(ftheta_path)))
    with meta_default_device():  # the method is built at config time, before; it runs here
        prompt = vlm.prepare(sample)
        out = generate(vlm, [prompt, prompt], selector, max_new_tokens=2)
    assert all(g.kept_per_layer[0] <= prompt.num_visual for g in out)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_relevance_and_first_layer_attention_with_the_default_device_on_meta(name, video_file):
    vlm = tiny(name)
    for sample in (Sample(id="i", question="What color ?", images=[random_image(2, 112, 140)]),
                   Sample(id="v", question="What happens ?", video=video_file)):
        with meta_default_device():
            prompt = vlm.prepare(sample)
            rv = relevance(vlm, prompt, [5, 6, 7], batch_tokens=2)
            a0 = first_layer_attention(vlm, prompt)
        assert rv.shape == a0.shape == (prompt.num_visual,)
        assert torch.isfinite(rv).all() and torch.isfinite(a0).all()


def test_an_evaluate_job_with_the_default_device_on_meta(tmp_path):
    from explain_prune.benchmarks.synthetic import SyntheticBenchmark
    from explain_prune.stages.evaluate import EvalSettings, evaluate
    from explain_prune.synthetic import register_resolvers

    register_resolvers()
    cfg = OmegaConf.load(ROOT / "conf/model/synthetic.yaml")
    vlm = build_vlm(cfg)
    with meta_default_device():
        results = evaluate(vlm, SyntheticBenchmark(limit=2), build_method("visionzip", 0.25), tmp_path,
                           EvalSettings(batch_size=2), cfg.llm)
    assert results["complete"] and results["num_samples"] == 2 and results["num_errors"] == 0
