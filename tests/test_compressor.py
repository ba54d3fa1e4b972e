"""R_v* labels, f_θ (App. B) padding invariance and its safetensors round trip, the metrics."""

import json

import pytest
import torch
from safetensors import safe_open

from explain_prune.compress.labels import make_label, topk_mask
from explain_prune.compress.module import KeepSetOverlap, masked_kl
from explain_prune.compress.network import (
    FTheta,
    FThetaConfig,
    load_compressor,
    save_compressor,
)
from explain_prune.core import InputError
from explain_prune.engine.flops import compressor_flops


def test_label_masks_bottom_half_and_normalises():
    rv = torch.tensor([0.1, 0.4, 0.3, 0.2, 0.5, 0.0])
    label = make_label(rv)
    assert torch.equal(label > 0, torch.tensor([False, True, True, False, True, False]))
    assert label.sum() == pytest.approx(1.0)
    assert label[4] / label[1] == pytest.approx(0.5 / 0.4)  # ratios kept: divided by the sum, no softmax


def test_label_ties_are_deterministic_and_padding_excluded():
    rv = torch.tensor([[1.0, 1.0, 1.0, 1.0, 9.0, 9.0], [2.0, 2.0, 2.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    label = make_label(rv, mask, 0.5)
    # row 0: 3 kept = the two 9s and the first (lowest index) of the tied 1s
    assert torch.equal(label[0] > 0, torch.tensor([True, False, False, False, True, True]))
    # row 1: 4 valid -> 2 kept = the first two tied values; padding stays 0
    assert torch.equal(label[1] > 0, torch.tensor([True, True, False, False, False, False]))
    assert torch.allclose(label.sum(-1), torch.ones(2))
    assert torch.equal(make_label(rv, mask, 0.5), label)
    # an all-zero row falls back to uniform over its kept positions
    zero = make_label(torch.zeros(4))
    assert torch.equal(zero, torch.tensor([0.5, 0.5, 0.0, 0.0]))
    with pytest.raises(InputError):
        make_label(rv, mask, 1.0)


def test_topk_mask_follows_retention_rule():
    values = torch.arange(10.0).repeat(2, 1)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    keep = topk_mask(values, mask, 0.25)
    assert keep[0].sum() == 2 and keep[0, 8:].all()  # round(2.5) = 2
    assert keep[1].sum() == 2 and keep[1, 5:7].all()  # round(1.75) = 2 of the 7 valid
    assert topk_mask(values, mask, 0.01).sum(-1).tolist() == [1, 1]  # k >= 1


def test_architecture_is_app_b():
    net = FTheta()
    assert [b.depthwise.groups for b in net.blocks] == [1, 32, 64, 128, 256]
    assert [b.depthwise.kernel_size[0] for b in net.blocks] == [3] * 5
    assert [b.pointwise.out_channels for b in net.blocks] == [32, 64, 128, 256, 512]
    assert net.head.in_channels == 512 and net.head.out_channels == 1
    # parameter count agrees with Eq. 6's multiply-accumulates per token (+ biases and the head)
    macs_per_token = compressor_flops(1, include_head=True)
    weights = sum(p.numel() for n, p in net.named_parameters() if n.endswith("weight"))
    assert weights == macs_per_token


@pytest.mark.parametrize("norm", ["mean", "log", "zscore", "none"])
def test_padding_does_not_leak(norm):
    torch.manual_seed(0)
    net = FTheta(FThetaConfig(input_norm=norm)).eval()
    short = torch.rand(37) + 0.01
    long = torch.rand(120) + 0.01
    alone = net(short[None], torch.ones(1, 37, dtype=torch.bool))[0]
    batch = torch.zeros(2, 120)
    batch[0, :37] = short
    batch[0, 37:] = 123.0  # garbage in the padding must not matter either
    batch[1] = long
    mask = torch.zeros(2, 120, dtype=torch.bool)
    mask[0, :37] = True
    mask[1] = True
    out = net(batch, mask)
    assert torch.allclose(out[0, :37], alone, atol=1e-6, rtol=0)
    assert torch.all(out[0, 37:] == 0)
    assert torch.allclose(out.sum(-1), torch.ones(2), atol=1e-5)


def test_input_norm_mean_is_scale_free():
    net = FTheta().eval()
    a0 = torch.rand(50) + 0.1
    assert torch.allclose(net(a0), net(a0 * 0.01), atol=1e-6)


def test_save_and_load_compressor(tmp_path):
    cfg = FThetaConfig(channels=[4, 8], kernel_size=5, activation="gelu", input_norm="log")
    net = FTheta(cfg).eval()
    path = save_compressor(tmp_path / "f.safetensors", net)
    with safe_open(str(path), framework="pt") as fh:
        assert json.loads(fh.metadata()["ftheta_config"]) == cfg.to_dict()
    back = load_compressor(path)
    assert back.config == cfg
    x = torch.rand(2, 30)
    assert torch.equal(back(x), net(x))
    with pytest.raises(InputError, match="not found"):
        load_compressor(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(InputError, match="junk"):
        load_compressor(tmp_path / "junk.safetensors")
    with pytest.raises(InputError, match="activation"):
        FThetaConfig(activation="swish")
    with pytest.raises(InputError, match="unknown keys"):
        FThetaConfig.from_dict({"chanels": [1]})


def test_masked_kl_and_overlap():
    label = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    pred = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    log_pred = torch.log(pred).masked_fill(~mask, float("-inf"))
    kl = masked_kl(label, log_pred, mask)
    assert torch.allclose(kl, torch.tensor([torch.log(torch.tensor(2.0)), torch.log(torch.tensor(2.0))]))
    assert torch.isfinite(kl).all()  # no 0 * -inf on the padded tail
    metric = KeepSetOverlap(0.5)
    metric.update(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), torch.tensor([[4.0, 1.0, 3.0, 2.0]]), torch.ones(1, 4, dtype=torch.bool))
    assert float(metric.compute()) == pytest.approx(0.5)  # {0,1} vs {0,2}
