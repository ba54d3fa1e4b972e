"""Run one (model, benchmark, method, retention) evaluation: predictions, score, efficiency record.

Predictions are appended to `predictions.jsonl` as they are produced (one fsynced line per
sample); a rerun in the same directory skips the ids already there, so a killed job resumes and
ends with the same results.json as an uninterrupted one (up to the measured seconds).  A sample
that cannot be read or prepared becomes an error line, counted in the results, never scored —
or stops the run under strict=true.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from tqdm import tqdm

from explain_prune.engine import flops as flops_lib
from explain_prune.benchmarks.base import Benchmark, Record
from explain_prune.core import RESULTS, InputError, jsonable, skip_or_raise, write_json_atomic
from explain_prune.data.prefetch import Prefetched, prefetch
from explain_prune.engine import generate
from explain_prune.models.base import VLM

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
TIMING_FIELDS = ("prefill_seconds", "decode_seconds")


class PredictionLog:
    """Append-only jsonl of per-sample results; tolerant of a half-written last line."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        if path.is_file():
            raw = path.read_bytes()
            good = raw[: raw.rfind(b"\n") + 1]  # a kill mid-line leaves a partial last line
            if len(good) != len(raw):
                log.warning("dropping a partial last line of %s", path)
                with open(path, "r+b") as fh:
                    fh.truncate(len(good))
            for lineno, line in enumerate(good.split(b"\n")[:-1], start=1):
                row = self._parse(line, lineno)
                self.rows[row["id"]] = row

    def _parse(self, line: bytes, lineno: int) -> dict[str, Any]:
        """One complete line; a damaged one stops the job (resuming past it would re-answer a
        sample whose id is unreadable, and scoring would silently miss it)."""
        try:
            row = json.loads(line)
            if isinstance(row, dict) and isinstance(row.get("id"), str):
                return row
            problem = "not a prediction row (a JSON object with an id)"
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            problem = f"not JSON ({err})"
        raise InputError(
            f"{self.path} line {lineno}: {problem}; delete that line to resume (its sample is then predicted again)"
        )

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row, sort_keys=True, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows[row["id"]] = row


@dataclass
class EvalSettings:
    limit: int | None = None
    strict: bool = False
    batch_size: int = 1
    max_new_tokens: int | None = None  # None: the benchmark's own
    num_workers: int = 0  # loader worker processes preparing samples ahead of the model (data.prefetch)


def already_logged(logged: frozenset[str], sample_id: str) -> str | None:
    """The loader's `select` for a resumed job: ids with a line in predictions.jsonl are not prepared again."""
    return "already logged" if sample_id in logged else None


def encode_batch(vlm: VLM, items: list[Prefetched], fail: Callable[[str, str], None]) -> list[tuple[Prefetched, Any]]:
    """(item, VisualPrompt) for the items whose device stage succeeds: the batch in one call, and,
    when one sample of it is bad, one at a time so that only that sample is a counted error."""
    try:
        return list(zip(items, vlm.encode_batch([item.host for item in items])))
    except InputError as err:
        if len(items) == 1:
            fail(items[0].id, str(err))
            return []
    encoded = []
    for item in items:
        try:
            encoded.append((item, vlm.encode(item.host)))
        except InputError as err:
            fail(item.id, str(err))
    return encoded


def first_stage_scores(gen: Any, num_visual_input: int) -> Any:
    """The ranking scores [N_v] of the method's first pruning stage (`plan.info["scores"]`, copied
    to `Generation.info` by the engine) when that stage saw all `num_visual_input` visual tokens
    of the prompt, else None (no scoring stage, or a prompt the method rewrote)."""
    scores = gen.info.get("scores") or {}
    if not scores:
        return None
    first = scores[min(scores)]
    return first if first.numel() == num_visual_input == gen.num_visual else None


def _batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def evaluate(
    vlm: VLM,
    benchmark: Benchmark,
    method: Any,
    out_dir: str | Path,
    settings: EvalSettings,
    llm_dims: Mapping[str, Any],
    judge: Any = None,
    run_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict every sample not yet in out_dir/predictions.jsonl, then score all of them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    llm_dims = dict(llm_dims)  # a plain dict once: reading a config node costs more per call than the FLOPs sum
    log_file = PredictionLog(out_dir / PREDICTIONS)
    if settings.max_new_tokens:  # the override becomes the benchmark's, so results.json records what ran
        benchmark.max_new_tokens = int(settings.max_new_tokens)
    max_new = benchmark.max_new_tokens

    def fail(sample_id: str, reason: str) -> None:
        skip_or_raise(sample_id, reason, settings.strict)
        log_file.append({"id": sample_id, "error": reason})

    requested: list[str] = []  # every id this job asks for, so finalize can tell a complete run
    stream = prefetch(
        functools.partial(benchmark.stream, settings.limit),
        vlm,
        settings.num_workers,
        select=functools.partial(already_logged, frozenset(log_file.rows)),
    )

    def prepared() -> Iterator[Prefetched]:
        for item in stream:
            requested.append(item.id)
            if item.error is not None:
                fail(item.id, item.error)
            elif item.passed is None:
                yield item

    for batch in tqdm(_batches(prepared(), settings.batch_size), desc=f"{benchmark.name}/{getattr(method, 'name', 'vanilla')}", unit="batch"):
        encoded = encode_batch(vlm, batch, fail)
        if not encoded:
            continue
        samples = [item.sample for item, _ in encoded]
        prompts = [prompt for _, prompt in encoded]
        generations = generate(vlm, prompts, method, max_new_tokens=max_new)
        for sample, prompt, gen in zip(samples, prompts, generations):
            record = {
                "id": sample.id,
                "prediction": gen.text,
                "answer": sample.answer,
                "extracted": benchmark.extract(gen.text, sample.meta),
                "meta": jsonable(sample.meta),
                "num_visual": gen.num_visual,
                # before the method's transform (VisionZip merges tokens before the LLM): the vanilla reference
                "num_visual_input": prompt.num_visual,
                "kept_per_layer": gen.kept_per_layer,
                "flops": flops_lib.llm_flops(llm_dims, gen.kept_per_layer),
                "kv_cache_bytes": gen.kv_cache_bytes,
                # the engine times whole batches; a sample's share is the batch time / batch size
                "prefill_seconds": gen.prefill_seconds / len(generations),
                "decode_seconds": gen.decode_seconds / len(generations),
            }
            scores = first_stage_scores(gen, prompt.num_visual)
            metrics = None if scores is None else benchmark.sample_metrics(sample.meta, scores)
            if metrics is not None:
                record["sample_metrics"] = metrics
            log_file.append(jsonable(record))
    return finalize(benchmark, method, out_dir, log_file, llm_dims, judge, run_info, requested)


def finalize(
    benchmark: Benchmark,
    method: Any,
    out_dir: Path,
    log_file: PredictionLog,
    llm_dims: Mapping[str, Any],
    judge: Any,
    run_info: Mapping[str, Any] | None,
    requested: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Score the logged rows (only the `requested` ids when given) and write results.json.

    `complete` is true only when every requested id has a line (a prediction or a counted error):
    `tracking.completed_results` skips such a job on a rerun; anything else is run (and resumed).
    """
    wanted = None if requested is None else set(requested)
    rows = sorted((r for r in log_file.rows.values() if wanted is None or r["id"] in wanted), key=lambda r: r["id"])
    scored = [r for r in rows if "error" not in r]
    errors = Counter(r["error"].split(":")[0][:80] for r in rows if "error" in r)
    records = [Record(r["id"], r["prediction"], r["answer"], r["extracted"], r["meta"], r.get("sample_metrics")) for r in scored]
    score = benchmark.score(records, judge=judge) if records else {"overall": None}
    n = len(scored)

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in scored) / n if n else 0.0

    num_layers = len(scored[0]["kept_per_layer"]) if scored else 0
    kept_mean = [sum(r["kept_per_layer"][i] for r in scored) / n for i in range(num_layers)]
    visual_mean = mean("num_visual")
    # visual tokens before the method's transform; rows logged before this field had none
    input_counts = [int(r.get("num_visual_input", r["num_visual"])) for r in scored]
    input_mean = sum(input_counts) / n if n else 0.0
    efficiency = {
        "num_visual": visual_mean,
        "num_visual_input": input_mean,
        "kept_per_layer": kept_mean,
        "layer_avg_retention": (sum(kept_mean) / (num_layers * input_mean)) if num_layers and input_mean else 1.0,
        "retention": getattr(method, "retention", 1.0) if method is not None else 1.0,
        "flops_T": flops_lib.tera(mean("flops")),
        "vanilla_flops_T": flops_lib.tera(
            sum(flops_lib.llm_flops(llm_dims, count) for count in input_counts) / n if n else 0.0
        ),
        "kv_cache_bytes": mean("kv_cache_bytes"),
        "prefill_seconds": mean("prefill_seconds"),
        "decode_seconds": mean("decode_seconds"),
    }
    results = {
        **dict(run_info or {}),
        "benchmark": benchmark.name,
        "method": getattr(method, "name", "vanilla") if method is not None else "vanilla",
        "prompt_id": benchmark.prompt_id,
        "extraction_id": benchmark.extraction_id,
        "judge": getattr(judge, "model", None) if judge is not None else None,
        "num_samples": n,
        "num_errors": sum(errors.values()),
        "errors": dict(errors),
        "score": score,
        "efficiency": efficiency,
        "complete": wanted is not None and wanted <= log_file.rows.keys(),
    }
    write_json_atomic(out_dir / RESULTS, results)
    return results
