"""Prepare samples ahead of the model: the CPU stage (`VLM.preprocess`) in DataLoader workers.

`evaluate` and `generate` read their samples through `prefetch`.  With `num_workers=0` everything
runs in this process, one sample after another.  With W > 0 workers, worker w iterates the sample
stream, takes the positions p with p % W == w, and yields exactly one `Prefetched` item for each
(a prepared sample, a counted error, or a pass-through such as "already cached").  torch's
DataLoader returns its workers' items round-robin in that same order, so items arrive in stream
order whatever W is: predictions, resume and the cache's contents do not depend on W.  Prefetch is
bounded by `prefetch_factor` items per worker.

Each worker reads the stream itself (the reading is cheap next to decoding and resizing; the
stream's own rows are not sent between processes) and runs `VLM.host_stage()`: the adapter
without its model.  torch sets every worker to one thread.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from explain_prune.core import DeferredSample, InputError, Sample, SampleError
from explain_prune.core.lock import close_inherited_locks

if TYPE_CHECKING:  # data sits below models; the loader only carries their HostInputs
    from explain_prune.models.base import VLM, HostInputs

StreamItem = Sample | SampleError | DeferredSample

MAX_AUTO_WORKERS = 8


def resolve_num_workers(num_workers: int | None) -> int:
    """`num_workers`: as given, or (null) half the CPUs this process may use, at most 8, so the
    model stage keeps cores of its own."""
    if num_workers is not None:
        return int(num_workers)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(MAX_AUTO_WORKERS, cpus // 2)


@dataclass
class Prefetched:
    """One item of the sample stream after the CPU stage.  `sample` keeps the id, question, answer
    and meta; its images / video are dropped (what the model needs of them is in `host`)."""

    sample: Sample
    host: HostInputs | None = None  # the CPU stage's output, when it ran
    error: str | None = None  # why the sample could not be read or preprocessed (a counted skip)
    passed: str | None = None  # why it was not preprocessed: `select` said so (already done, another shard)
    fatal: str | None = None  # the stream itself failed (a missing benchmark file): the job stops with this line

    @property
    def id(self) -> str:
        return self.sample.id

    def pin_memory(self) -> "Prefetched":
        """DataLoader(pin_memory=True) calls this: page-locked host tensors for a cuda model."""
        return self if self.host is None else dataclasses.replace(self, host=self.host.pin_memory())


class PreprocessedStream(IterableDataset):
    """This worker's share of `samples()`, through `stage` (see the module docstring for the order)."""

    def __init__(
        self,
        samples: Callable[[], Iterable[StreamItem]],
        stage: Callable[[Sample], "HostInputs"],
        select: Callable[[str], str | None] | None = None,
    ):
        self.samples, self.stage, self.select = samples, stage, select

    def __iter__(self) -> Iterator[Prefetched]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            for position, item in enumerate(self.samples()):
                if position % workers == worker:
                    yield self.process(item)
        except InputError as err:  # sent as an item, so a worker's failure is the same one line as in-process
            yield Prefetched(Sample(id="", question=""), fatal=str(err))

    def process(self, item: StreamItem) -> Prefetched:
        reason = self.select(item.id) if self.select is not None else None
        if reason is not None:
            return Prefetched(Sample(id=item.id, question=""), passed=reason)
        if isinstance(item, SampleError):
            return Prefetched(Sample(id=item.id, question=""), error=item.reason)
        try:
            sample = item.read() if isinstance(item, DeferredSample) else item
            light = dataclasses.replace(sample, images=[], video=None)
            return Prefetched(light, host=self.stage(sample))
        except InputError as err:
            return Prefetched(Sample(id=item.id, question=""), error=str(err))


def _as_is(item: Prefetched) -> Prefetched:
    return item


def prefetch(
    samples: Callable[[], Iterable[StreamItem]],
    vlm: "VLM",
    num_workers: int,
    select: Callable[[str], str | None] | None = None,
    prefetch_factor: int = 2,
) -> Iterator[Prefetched]:
    """The stream `samples()` with `vlm`'s CPU stage run ahead of the caller, in stream order.

    `samples` (a callable, so each worker can open the stream) and `select` must pickle when the
    workers are not forked.  Host tensors are page-locked when the model is on cuda."""
    if num_workers < 0:
        raise InputError(f"num_workers must be >= 0, got {num_workers}")
    stage = vlm.host_stage() if num_workers else vlm.preprocess
    loader = DataLoader(
        PreprocessedStream(samples, stage, select),
        batch_size=None,
        collate_fn=_as_is,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None,
        pin_memory=num_workers > 0 and vlm.device.type == "cuda",
        worker_init_fn=_worker_init if num_workers else None,
    )
    with torch.device("cpu"):  # the loader's own seed tensors are host bookkeeping
        items = iter(loader)
    return _raise_fatal(items)


def _worker_init(worker_id: int) -> None:
    close_inherited_locks()  # a worker must not keep its parent's cache / run-dir lock alive


def _raise_fatal(items: Iterator[Prefetched]) -> Iterator[Prefetched]:
    for item in items:
        if item.fatal is not None:
            raise InputError(item.fatal)
        yield item
