"""App. C figures reproduced from the model configs' llm: widths (within 2 %)."""

from pathlib import Path

import pytest
import yaml

from explain_prune.core import InputError
from explain_prune.engine.flops import (
    compressor_flops,
    first_layer_attention_flops,
    kv_cache_bytes,
    layer_averaged_retention,
    llm_flops,
    tera,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
PAPER_DIMS = {"hidden_size": 3584, "intermediate_size": 18944, "num_layers": 28, "num_kv_heads": 4, "head_dim": 128}


def dims(name: str) -> dict:
    return yaml.safe_load((CONF / f"{name}.yaml").read_text())["llm"]


@pytest.mark.parametrize(
    "model, n, expected_T",
    [
        ("llava_ov", 1728, 12.9),  # Table 9, image
        ("qwen2vl", 1302, 9.6),  # Table 9, image
        ("llava_ov", 6272, 52.7),  # Table 10, 32 frames
        ("qwen2vl", 5824, 48.4),  # Table 10, 32 frames 720x1280
        ("vila15", 3136, 27.0),  # Table 10, 16 frames
    ],
)
def test_llm_flops_match_paper(model, n, expected_T):
    assert tera(llm_flops(dims(model), n)) == pytest.approx(expected_T, rel=0.02)


def test_app_c_worked_example():
    total = llm_flops(PAPER_DIMS, 1568)
    assert tera(total) == pytest.approx(11.69, rel=0.005)
    attn = first_layer_attention_flops(PAPER_DIMS, 1568)
    assert tera(attn) == pytest.approx(0.02, rel=0.02)
    assert attn / total == pytest.approx(0.0017, rel=0.05)  # 0.17 %
    conv = compressor_flops(1568, (32, 64, 128, 256, 512), 3)
    assert tera(conv) == pytest.approx(0.0003, rel=0.1)
    assert conv / total == pytest.approx(0.000026, rel=0.1)  # 0.0026 %
    assert compressor_flops(1568, include_head=True) == conv + 1568 * 512


def test_per_layer_counts_are_exact():
    d = dims("qwen2vl")
    n = 1302
    # all layers equal == scalar; pruning after layer 2 counts the first two at full size
    assert llm_flops(d, [n] * 28) == llm_flops(d, n)
    k = round(0.25 * n)
    staged = llm_flops(d, [n, n] + [k] * 26)
    assert llm_flops(d, k) < staged < llm_flops(d, n)
    assert staged == pytest.approx(2 / 28 * llm_flops(d, n) + 26 / 28 * llm_flops(d, k))
    with pytest.raises(InputError, match="28 layers"):
        llm_flops(d, [n] * 3)


def test_kv_cache_qwen2vl():
    d = dims("qwen2vl")
    full = kv_cache_bytes(d, 1302, bytes_per_value=2)
    assert full / 2**20 == pytest.approx(71.2, rel=0.005)
    assert kv_cache_bytes(d, round(0.25 * 1302), 2) / 2**20 == pytest.approx(17.8, rel=0.005)
    assert kv_cache_bytes(d, [1302] * 28, 2) == full


def test_layer_averaged_retention():
    assert layer_averaged_retention([100, 100, 50, 50], 100) == pytest.approx(0.75)
    with pytest.raises(InputError):
        layer_averaged_retention([], 10)
    with pytest.raises(InputError, match="hidden_size"):
        llm_flops({"num_layers": 2}, 10)
