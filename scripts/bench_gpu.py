"""The GPU benchmark of scripts/gpu_check.sh: a random-weight model with the real Qwen2-VL-7B shape.

Built from a config, no download: 28 decoder layers, hidden 3584, MLP 18944, 28 heads x 128, 4 KV heads,
bfloat16, on cuda (a tiny vision tower feeds it: its cost is not what is measured).  Measured, in one run:

* prefill and decode seconds, kept visual tokens and KV MiB for vanilla, ours (a random f_θ: timing
  only), fastv, pdrop, dart and visionzip at 50 / 25 / 10 % retention, on a 1 302-visual-token image
  prompt and a 5 824-token video prompt (the paper's App. C sizes); the measured prefill speed-up
  beside the one the FLOPs predict (Eq. 4 over the visual tokens of every layer; paper Table 4: 1.60x
  at 25 %);
* decode tokens/s of the engine and of HF `generate` (its prefill included) at batch 1 and 8;
* relevance (Eq. 1) seconds and peak memory at N = 1 500 and 6 000 visual tokens;
* a 32-frame video evaluate (four 10 s 720p clips at Qwen2-VL-7B's video budget) in-process and with
  2 loader workers: samples/s and the model stage's share of the loop.

`--tiny` runs the same steps on the CPU with a 28-layer model of tiny widths and small prompts, so the
script is exercised in CI.  Writes one JSON of figures (`--out`).

    python scripts/bench_gpu.py [--tiny] [--out gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # bench_evaluate / bench_prefetch helpers

from explain_prune.compress.network import FTheta, FThetaConfig, save_compressor  # noqa: E402
from explain_prune.core import Sample  # noqa: E402
from explain_prune.engine import generate  # noqa: E402
from explain_prune.engine.flops import llm_flops  # noqa: E402
from explain_prune.explain import relevance  # noqa: E402
from explain_prune.methods import build_method  # noqa: E402
from explain_prune.models import build_vlm  # noqa: E402

SHAPES = {  # language model widths: the 7B's, and the CPU form's
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_heads=28, num_kv_heads=4, mrope_section=[16, 24, 24]),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, mrope_section=[4, 6, 6]),
}
SIZES = {  # (image grid rows, cols) in tokens, (video frames, rows, cols); relevance N
    "7b": ((31, 42), (32, 14, 26), (1500, 6000)),  # 1 302 and 16 x 364 = 5 824 visual tokens
    "tiny": ((6, 8), (4, 4, 6), (60, 150)),
}
METHODS = ("ours", "fastv", "pdrop", "dart", "visionzip")
RETENTIONS = (0.5, 0.25, 0.1)


def build(shape: str, device: str, dtype: str):
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny_qwen2vl.yaml")
    widths = SHAPES[shape]
    cfg.tiny.update(num_layers=28, initializer_range=0.02, **widths)
    cfg.llm.update(hidden_size=widths["hidden_size"], intermediate_size=widths["intermediate_size"], num_layers=28,
                   num_heads=widths["num_heads"], num_kv_heads=widths["num_kv_heads"],
                   head_dim=widths["hidden_size"] // widths["num_heads"])
    cfg.update(device=device, dtype=dtype)
    cfg.image.update(min_pixels=28 * 28, max_pixels=10**8)
    cfg.video.update(min_pixels=28 * 28, max_pixels=10**8)
    return build_vlm(cfg), OmegaConf.to_container(cfg.llm)


def frame(rows: int, cols: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (rows * 28, cols * 28, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def prompts(vlm, shape: str):
    (rows, cols), (frames, vrows, vcols), _ = SIZES[shape]
    image = vlm.prepare(Sample(id="image", question="Describe the image .", images=[frame(rows, cols, 0)]))
    vlm.num_frames = frames
    video = vlm.prepare(Sample(id="video", question="What happens ?", video=[frame(vrows, vcols, i) for i in range(frames)]))
    return {"image": image, "video": video}


def sync(vlm) -> None:
    if vlm.device.type == "cuda":
        torch.cuda.synchronize()


def timed_generate(vlm, prompt, method, new_tokens: int, repeats: int):
    """The median prefill / decode seconds over `repeats` runs after one warm-up, and the last Generation."""
    runs = []
    for _ in range(repeats + 1):
        runs.append(generate(vlm, prompt, method, max_new_tokens=new_tokens))
    runs = runs[1:]
    return (float(np.median([g.prefill_seconds for g in runs])), float(np.median([g.decode_seconds for g in runs])), runs[-1])


def pruning_table(vlm, dims, prompt_set, ftheta: str, repeats: int) -> list[dict]:
    rows = []
    for kind, prompt in prompt_set.items():
        base_prefill, base_decode, base = timed_generate(vlm, prompt, None, 8, repeats)
        base_flops = llm_flops(dims, base.kept_per_layer)
        rows.append({"input": kind, "method": "vanilla", "retention": 1.0, "visual": prompt.num_visual,
                     "prefill_s": base_prefill, "decode_s": base_decode, "kv_mib": base.kv_cache_bytes / 2**20,
                     "speedup": 1.0, "flops_speedup": 1.0})
        for name in METHODS:
            for retention in RETENTIONS:
                options = {"checkpoint": ftheta} if name == "ours" else {}
                method = build_method(name, retention, **options)
                prefill, decode, gen = timed_generate(vlm, prompt, method, 8, repeats)
                rows.append({"input": kind, "method": name, "retention": retention, "visual": prompt.num_visual,
                             "prefill_s": prefill, "decode_s": decode, "kv_mib": gen.kv_cache_bytes / 2**20,
                             "speedup": base_prefill / prefill, "flops_speedup": base_flops / llm_flops(dims, gen.kept_per_layer)})
                print(f"{kind:5s} {name:9s} {retention:4.2f}: prefill {prefill:7.3f} s ({rows[-1]['speedup']:.2f}x, FLOPs "
                      f"{rows[-1]['flops_speedup']:.2f}x), decode {decode:6.3f} s, KV {rows[-1]['kv_mib']:8.1f} MiB", flush=True)
    return rows


def decode_rates(vlm, prompt, new_tokens: int) -> dict:
    """Decoded tokens per second: the engine at batch 1 and 8 (EOS disabled so every step runs), HF at 1."""
    config = vlm.model.generation_config
    eos, config.eos_token_id = config.eos_token_id, [-1]
    try:
        rates = {}
        for batch in (1, 8):
            generate(vlm, [prompt] * batch, None, max_new_tokens=2)  # warm-up
            out = generate(vlm, [prompt] * batch, None, max_new_tokens=new_tokens)
            rates[f"engine_batch{batch}"] = batch * (new_tokens - 1) / out[0].decode_seconds
        for batch in (1, 8):  # one prompt repeated: equal lengths, no padding
            inputs = dict(inputs_embeds=prompt.inputs_embeds.expand(batch, -1, -1),
                          position_ids=prompt.position_ids.expand(-1, batch, -1) if prompt.position_ids.dim() == 3
                          else prompt.position_ids.expand(batch, -1),
                          attention_mask=prompt.attention_mask.expand(batch, -1), do_sample=False)
            vlm.model.generate(**inputs, max_new_tokens=2)
            sync(vlm)
            start = time.perf_counter()
            vlm.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            sync(vlm)
            rates[f"hf_generate_batch{batch}_incl_prefill"] = batch * new_tokens / (time.perf_counter() - start)  # HF: prefill inside
    finally:
        config.eos_token_id = eos
    return rates


def relevance_figures(vlm, shape: str) -> list[dict]:
    out = []
    for n in SIZES[shape][2]:
        rows = max(1, int(n**0.5))
        prompt = vlm.prepare(Sample(id=f"r{n}", question="What is it ?", images=[frame(rows, max(1, n // rows), 9)]))
        if vlm.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        sync(vlm)
        start = time.perf_counter()
        rv = relevance(vlm, prompt, [11, 12, 13, 14])
        sync(vlm)
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if vlm.device.type == "cuda" else None
        if not torch.isfinite(rv).all():
            raise SystemExit(f"relevance at N={prompt.num_visual} is not finite")
        out.append({"visual": prompt.num_visual, "seconds": seconds, "peak_gib_above_model": peak})
        shown = "n/a on cpu" if peak is None else f"{peak:.2f} GiB above the model"
        print(f"relevance N={prompt.num_visual}: {seconds:.2f} s, peak {shown}", flush=True)
    return out


def video_evaluate(vlm, dims, shape: str, workers: int = 2) -> dict:
    """A Video-MME-layout evaluate (scripts/bench_prefetch.py's clips) in-process and with `workers`
    loader workers: samples/s and the model stage's share of the loop (encode + generate)."""
    from bench_evaluate import summarize, timed_job
    from bench_prefetch import write_fixture

    from explain_prune.benchmarks import build_benchmark

    videos, frames, size = (2, 4, dict(width=320, height=240, seconds=2)) if shape == "tiny" else (4, 32, {})
    budget = OmegaConf.load(ROOT / "conf" / "model" / "qwen2vl.yaml").video  # the 7B's video budget
    vlm.video_min_pixels, vlm.video_max_pixels = (28 * 28 * 4, 28 * 28 * 16) if shape == "tiny" else (budget.min_pixels, budget.max_pixels)
    vlm.num_frames = frames
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_fixture(Path(tmp), videos, **size)
        method = build_method("vanilla", 1.0)
        timed_job(vlm, build_benchmark(name="videomme", root=str(root)), method, dims, 1, 0)  # warm-up
        for arm, n in (("in_process", 0), (f"workers_{workers}", workers)):
            stats = summarize([timed_job(vlm, build_benchmark(name="videomme", root=str(root)), method, dims, 1, n)], videos)
            out[arm] = {"samples_per_s": stats["rate"], "model_share": stats["encode"] + stats["generate"],
                        "waiting_on_preparation_share": stats["prepare"]}
            print(f"video evaluate ({frames} frames, {arm}): {stats['rate']:.2f} samples/s, model stage "
                  f"{out[arm]['model_share']:.1%} of the loop, waiting on preparation {stats['prepare']:.1%}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the CPU form: tiny widths, small prompts")
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check.json"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = "tiny" if args.tiny else "7b"
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device (run with --tiny for the CPU form)")
    device, dtype = ("cpu", "float32") if args.tiny else ("cuda", "bfloat16")
    torch.manual_seed(0)
    if args.tiny:
        torch.set_num_threads(2)  # small ops: more threads only add scheduling noise
    vlm, dims = build(shape, device, dtype)
    prompt_set = prompts(vlm, shape)
    print(f"{shape} shape on {device} ({dtype}): image {prompt_set['image'].num_visual} visual tokens, "
          f"video {prompt_set['video'].num_visual}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ftheta = str(save_compressor(Path(tmp) / "f.safetensors", FTheta(FThetaConfig())))
        figures = {
            "shape": shape, "device": device, "dtype": dtype,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "pruning": pruning_table(vlm, dims, prompt_set, ftheta, 1 if args.tiny else args.repeats),
        }
    figures["decode_tokens_per_s"] = decode_rates(vlm, prompt_set["image"], 16)
    print(f"decode tokens/s: {figures['decode_tokens_per_s']}", flush=True)
    figures["relevance"] = relevance_figures(vlm, shape)
    figures["video_evaluate"] = video_evaluate(vlm, dims, shape)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1))
    print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
