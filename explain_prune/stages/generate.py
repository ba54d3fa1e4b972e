"""Build a relevance cache: for each sample, answer greedily, then cache (A_v^0, R_v) and the other
layer-0 per-token features (`explain.attention.FIRST_LAYER_FEATURES`) that compressor variants read.

Resumable and shardable: a sample belongs to part `shard_id` of `num_shards` by a stable hash of
its id, ids already in the cache are skipped, and the cache writer makes every shard atomic.
A bad sample is a counted skip with its reason (or stops the run under strict=true).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

from tqdm import tqdm

from explain_prune.core import DeferredSample, InputError, Sample, SampleError, skip_or_raise
from explain_prune.core.schema import check_dataclass
from explain_prune.data.cache import CacheWriter
from explain_prune.data.prefetch import prefetch, resolve_num_workers
from explain_prune.engine import generate
from explain_prune.explain.attention import first_layer_features
from explain_prune.explain.relevance import RelevanceSettings, cached_settings, relevance
from explain_prune.models.base import VLM

log = logging.getLogger(__name__)


def in_shard(sample_id: str, shard_id: int, num_shards: int) -> bool:
    """Deterministic split by a hash of the id (stable across runs, machines and orders)."""
    digest = hashlib.sha1(sample_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_shards == shard_id


@dataclass
class Summary:
    read: int = 0
    other_shards: int = 0
    already_cached: int = 0
    cached: int = 0
    correct: int = 0
    incorrect: int = 0
    skipped: Counter = field(default_factory=Counter)
    visual_tokens: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["skipped"] = dict(self.skipped)
        out["mean_visual_tokens"] = self.visual_tokens / self.cached if self.cached else 0.0
        out["seconds_per_sample"] = self.seconds / self.cached if self.cached else 0.0
        return out

    def line(self) -> str:
        d = self.as_dict()
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"read {self.read} | cached {self.cached} (correct {self.correct}, incorrect {self.incorrect}) | "
            f"already cached {self.already_cached} | other shards {self.other_shards} | skipped {sum(self.skipped.values())} "
            f"({skipped}) | mean visual tokens {d['mean_visual_tokens']:.1f} | {d['seconds_per_sample']:.2f} s/sample"
        )


def _skip(summary: Summary, sample_id: str, reason: str, strict: bool) -> None:
    skip_or_raise(sample_id, reason, strict, "data.strict=true")
    summary.skipped[reason.split(":")[0][:60]] += 1  # counted by the reason's first clause


def generation_select(done: frozenset[str], shard_id: int, num_shards: int, sample_id: str) -> str | None:
    """The loader's `select`: why a sample is not prepared in this job (None: it is)."""
    if not in_shard(sample_id, shard_id, num_shards):
        return "other shard"
    return "already cached" if sample_id in done else None


def collect(
    vlm: VLM,
    samples: Callable[[], Iterable[Sample | SampleError | DeferredSample]],
    writer: CacheWriter,
    settings: RelevanceSettings,
    judge_correct: Any,
    shard_id: int = 0,
    num_shards: int = 1,
    strict: bool = False,
    total: int | None = None,
    num_workers: int = 0,
) -> Summary:
    """Fill `writer` with (A_v^0, R_v) of every sample of this shard in `samples()` (the stream is
    prepared by `num_workers` loader workers, data.prefetch); `judge_correct(prediction, sample) ->
    bool | None` implements the App. B correctness filter (None: no reference)."""
    summary = Summary()
    eos = vlm.eos_token_ids[0]
    select = functools.partial(generation_select, frozenset(writer.done_ids()), shard_id, num_shards)
    start = time.perf_counter()
    stream = prefetch(samples, vlm, num_workers, select=select)
    for item in tqdm(stream, total=total, desc=f"relevance part {shard_id}/{num_shards}", unit="sample"):
        summary.read += 1
        if item.passed == "other shard":
            summary.other_shards += 1
            continue
        if item.passed is not None:
            summary.already_cached += 1
            continue
        if item.error is not None:
            _skip(summary, item.id, item.error, strict)
            continue
        try:
            prompt = vlm.encode(item.host)
        except InputError as err:
            _skip(summary, item.id, str(err), strict)
            continue
        if prompt.num_visual == 0:
            _skip(summary, item.id, "no visual tokens", strict)
            continue
        answer = generate(vlm, prompt, None, max_new_tokens=settings.max_new_tokens)
        answer_ids = answer.tokens + ([eos] if settings.include_eos else [])
        if not answer_ids:
            _skip(summary, item.id, "empty answer: the model stopped at once", strict)
            continue
        correct = judge_correct(answer.text, item.sample)
        rv = relevance(
            vlm, prompt, answer_ids, settings.head_reduce, settings.clamp, settings.batch_tokens, head_block=settings.head_block
        )
        features = first_layer_features(vlm, prompt, settings.a0_query)  # A_v^0 and the compressor variants' inputs
        a0 = features.pop("a0")
        writer.add(item.id, a0, rv, grid=prompt.visual_grid, correct=correct, answer=answer.text, features=features)
        summary.cached += 1
        summary.correct += int(correct is True)
        summary.incorrect += int(correct is False)
        summary.visual_tokens += prompt.num_visual
    writer.flush()
    summary.seconds = time.perf_counter() - start  # wall time: preparation overlaps the model with workers
    return summary


def build_cache(cfg: Any) -> Summary:
    """Compose model, source and writer from a generate-style config and fill the cache.

    Used by `python -m explain_prune.generate` and by `train` when its default cache is missing.
    `cfg` needs: model, data, modality, relevance, cache_dir, shard_id, num_shards.
    """
    from omegaconf import OmegaConf

    from explain_prune.data.cache import make_meta
    from explain_prune.data.correctness import is_correct
    from explain_prune.data.sources import build_source
    from explain_prune.models import build_vlm

    settings = check_dataclass(RelevanceSettings, "relevance", OmegaConf.to_container(cfg.relevance, resolve=True))
    source = build_source(cfg.data)
    determinants = {
        "relevance": cached_settings(settings),
        "llm": OmegaConf.to_container(cfg.model.get("llm", {}), resolve=True),  # another depth or width: another cache
        "image": OmegaConf.to_container(cfg.model.get("image", {}), resolve=True),
        "video": OmegaConf.to_container(cfg.model.get("video", {}), resolve=True),
        "modality": OmegaConf.to_container(cfg.modality, resolve=True),
    }
    meta = make_meta(
        model=cfg.model.name,
        data=cfg.data.name,
        modality=cfg.modality.name,
        model_id=cfg.model.get("pretrained"),
        data_source=cfg.data.get("source"),
        config=determinants,
    )

    def judge_correct(prediction: str, sample: Sample) -> bool | None:
        return None if sample.answer is None else is_correct(prediction, sample.answer, sample.meta)

    with CacheWriter(  # takes the part's lock before the model loads: a second writer stops at once
        cfg.cache_dir, meta, shard_id=cfg.shard_id, num_shards=cfg.num_shards, shard_size=cfg.get("shard_size", 256)
    ) as writer:
        vlm = build_vlm(cfg.model, modality=cfg.modality)
        total = len(source) if hasattr(source, "__len__") else None
        summary = collect(
            vlm, source.stream, writer, settings, judge_correct, cfg.shard_id, cfg.num_shards,
            strict=bool(cfg.data.get("strict", False)), total=total, num_workers=resolve_num_workers(cfg.get("num_workers")),
        )
    return summary
