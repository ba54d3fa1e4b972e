"""Compressor variants: the layer-0 features they read, the cache format (2) that holds them, the
multi-channel f_θ and the compressor registry (docs/synthetic.md §Compressor variants)."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import explain_prune.cli  # noqa: F401  (registers the ${ep.asset:...} resolver of the synthetic model config)
from explain_prune.compress.network import (
    COMPRESSORS,
    Compressor,
    FTheta,
    FThetaConfig,
    load_compressor,
    save_compressor,
    stack_inputs,
)
from explain_prune.config import check_config
from explain_prune.core import InputError
from explain_prune.data.cache import CACHE_FORMAT, CacheReader, CacheWriter, make_meta
from explain_prune.explain import first_layer_attention, first_layer_features
from explain_prune.models import Sample, build_vlm
from helpers import ROOT, TINY_MODELS, model_cfg, random_image


# --- the features, against HF's own eager attention and projections -------------------------------


@pytest.mark.parametrize("name", TINY_MODELS)
def test_first_layer_features_equal_eager_heads_and_hooked_projections(name):
    vlm = build_vlm(model_cfg(name, dtype="float32", attn_implementation="sdpa"))
    prompt = vlm.prepare(Sample(id="i", question="What color is the object ?", images=[random_image(5, 112, 140)]))
    features = first_layer_features(vlm, prompt)
    attn = vlm.decoder.layers[0].self_attn
    captured = {}
    hooks = [
        getattr(attn, proj).register_forward_hook(lambda _m, _i, out, proj=proj: captured.__setitem__(proj, out[0]))
        for proj in ("k_proj", "v_proj")
    ]
    try:
        with vlm.attention_implementation("eager"), torch.no_grad():
            out = vlm.model(inputs_embeds=prompt.inputs_embeds, position_ids=prompt.position_ids, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    visual = prompt.visual_index
    eager = out.attentions[0][0][:, prompt.instruction_index][:, :, visual].mean(dim=1)  # [H, N_v]
    heads = eager.shape[0]
    assert features["a0_heads"].shape == (prompt.num_visual, heads)
    assert float((features["a0_heads"] - eager.T).abs().max()) <= 1e-6
    assert float((features["a0"] - first_layer_attention(vlm, prompt)).abs().max()) <= 1e-7
    norms = [captured[p][visual].view(prompt.num_visual, -1, attn.head_dim).norm(dim=-1).mean(-1) for p in ("k_proj", "v_proj")]
    torch.testing.assert_close(features["kv_norm"], torch.stack(norms, dim=-1), atol=1e-5, rtol=1e-5)


# --- cache format 2 ----------------------------------------------------------------------------------


def _features(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a0_heads": torch.rand(n, 4, generator=g), "kv_norm": torch.rand(n, 2, generator=g)}


def test_cache_round_trips_per_token_features(tmp_path):
    written = {}
    with CacheWriter(tmp_path, make_meta("m", "d", "image"), shard_size=2) as writer:
        for i, n in enumerate((5, 3, 7)):
            written[f"s{i}"] = (torch.rand(n), _features(n, i))
            writer.add(f"s{i}", written[f"s{i}"][0], torch.rand(n), features=written[f"s{i}"][1])
    assert json.loads((tmp_path / "meta.json").read_text())["format"] == CACHE_FORMAT == 2
    full = CacheReader(tmp_path, features=["a0_heads", "kv_norm"])
    for sample in full:
        a0, feats = written[sample.id]
        assert torch.equal(sample.a0, a0)
        for key, value in feats.items():
            assert torch.equal(sample.features[key], value)
        x = stack_inputs(sample.a0, sample.features, ["a0", "kv_norm", "a0_heads"])  # [1 + 2 + 4, N]
        assert torch.equal(x, torch.cat([a0[None], feats["kv_norm"].T, feats["a0_heads"].T]))
    assert all(s.features == {} for s in CacheReader(tmp_path))  # only what is asked for is read
    with pytest.raises(InputError, match=r"holds no per-token feature 'value_norm' \(it holds: a0_heads, kv_norm\)"):
        CacheReader(tmp_path, features=["value_norm"])


def test_old_cache_format_is_refused_with_one_line(tmp_path):
    with CacheWriter(tmp_path, make_meta("m", "d", "image")) as writer:
        writer.add("s", torch.rand(3), torch.rand(3))
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(InputError) as err:
        CacheReader(tmp_path)
    assert "format 1, this code reads format 2" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="format 1"):  # nor is it appended to
        CacheWriter(tmp_path, {**meta, "format": CACHE_FORMAT})


def test_cache_writer_refuses_bad_features(tmp_path):
    with CacheWriter(tmp_path, make_meta("m", "d", "image")) as writer:
        with pytest.raises(InputError, match=r"feature 'kv_norm' has shape \(4, 2\), need \[3, C\]"):
            writer.add("a", torch.rand(3), torch.rand(3), features={"kv_norm": torch.rand(4, 2)})
        with pytest.raises(InputError, match="non-finite value in kv_norm"):
            writer.add("b", torch.rand(3), torch.rand(3), features={"kv_norm": torch.tensor([[1.0, float("nan")]] * 3)})
        writer.add("c", torch.rand(3), torch.rand(3), features={"kv_norm": torch.rand(3, 2)})
        with pytest.raises(InputError, match="differ from the other samples"):
            writer.add("d", torch.rand(3), torch.rand(3))


# --- the multi-channel f_θ ------------------------------------------------------------------------------


def test_multichannel_ftheta_pads_cleanly_and_round_trips(tmp_path):
    torch.manual_seed(0)
    net = FTheta(FThetaConfig(channels=[8, 8], inputs=["a0", "kv_norm"], in_channels=3)).eval()
    short, long = torch.rand(3, 37) + 0.01, torch.rand(3, 90) + 0.01
    alone = net(short[None])[0]
    batch = torch.full((2, 3, 90), 55.0)  # garbage in the padding
    batch[0, :, :37], batch[1] = short, long
    mask = torch.zeros(2, 90, dtype=torch.bool)
    mask[0, :37], mask[1] = True, True
    out = net(batch, mask)
    assert torch.allclose(out[0, :37], alone, atol=1e-6, rtol=0) and torch.all(out[0, 37:] == 0)
    # channels are normalised one by one: scaling one channel changes nothing
    scaled = short.clone()
    scaled[1] *= 40.0
    assert torch.allclose(net(scaled[None])[0], alone, atol=1e-6)
    back = load_compressor(save_compressor(tmp_path / "kv.safetensors", net))
    assert back.config.inputs == ["a0", "kv_norm"] and back.config.in_channels == 3
    assert torch.equal(back(batch, mask), out)
    with pytest.raises(InputError, match=r"expected \[B, 3, N\]"):
        net(torch.rand(1, 2, 10))
    with pytest.raises(InputError, match="in_channels unknown"):
        FTheta(FThetaConfig(inputs=["a0_heads"]))
    with pytest.raises(InputError, match="'a1' unknown"):
        FThetaConfig(inputs=["a1"])
    assert FThetaConfig().in_channels == 1  # the paper's one channel


def test_a_registered_compressor_is_built_saved_and_loaded_by_name(tmp_path):
    """A new compressor is its class (registered by name) plus a yaml naming it."""

    class ChannelMix(Compressor):  # a per-token linear mix of the input channels
        config_class = FThetaConfig

        def __init__(self, config=None):
            super().__init__(config)
            self.mix = torch.nn.Conv1d(self.config.in_channels, 1, 1)

        def logits(self, x, mask=None):
            x, mask, single = self._prepare(x, mask)
            out = self.mix(x).squeeze(1).masked_fill(~mask, float("-inf"))
            return out[0] if single else out

        def flops(self, n_visual):
            return float(n_visual * self.config.in_channels)

    COMPRESSORS.register("test_channel_mix")(ChannelMix)
    try:
        net = ChannelMix({"inputs": ["a0", "kv_norm"], "in_channels": 3})
        back = load_compressor(save_compressor(tmp_path / "mix.safetensors", net))
        assert type(back) is ChannelMix and back.flops(10) == 30.0
        x = torch.rand(2, 3, 11)
        assert torch.equal(back(x), net(x)) and torch.allclose(back(x).sum(-1), torch.ones(2))
        check_config(_train_cfg("compressor.name=test_channel_mix"))  # its yaml would only name it
    finally:
        del COMPRESSORS._classes["test_channel_mix"]


def _train_cfg(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize(
    "override,message",
    [
        ("compressor.name=mystery", r"unknown compressor 'mystery' \(allowed: ftheta"),
        ("compressor.net.inputs=[a0,q_norm]", r"compressor.net: compressor inputs: 'q_norm' unknown"),
        ("compressor.net.inputs=[a0,a0]", "listed twice"),
        ("+compressor.net.in_channels=3", "set by train from the cache"),
    ],
)
def test_compressor_config_is_checked_when_read(override, message):
    with pytest.raises(InputError, match=message):
        check_config(_train_cfg(override))


@pytest.mark.parametrize("variant,inputs", [("heads", ["a0_heads"]), ("kvnorm", ["a0", "kv_norm"])])
def test_variant_yamls_select_their_inputs(variant, inputs):
    cfg = _train_cfg(f"compressor={variant}")
    check_config(cfg)
    assert list(cfg.compressor.net.inputs) == inputs and cfg.compressor.name == "ftheta"
    assert list(cfg.compressor.net.channels) == [32, 64, 128, 256, 512]  # the paper's network otherwise
