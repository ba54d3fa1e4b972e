"""LightningDataModule over relevance caches: (A_v^0, R_v*) pairs for training f_θ.

- Samples come from one or more caches (`CacheReader`), by default without those the MLLM
  answered incorrectly (App. B; samples of unknown correctness are kept).
- The train/val split is a function of each sample's key alone (sha256 of "seed:data/id"), so it
  is the same for any set of caches, order, or number of workers/ranks.
- Batches are length-bucketed: each epoch the training samples are shuffled (seed + epoch), cut
  into buckets of `bucket_batches * batch_size`, each bucket sorted by length and cut into batches,
  and the batches shuffled.  This keeps padding to a few percent while keeping batches random.
- Under DDP the sampler shards samples itself (rank::world_size of the seeded order, equal counts
  for training), so the trainer runs with `use_distributed_sampler=False`.
- Collate pads to the longest sample and returns a dict with the compressor's input x [B, C, N]
  (its `inputs` features stacked as channels; C = 1 for the paper's A_v^0), A_v^0, R_v, the mask
  and R_v* computed from R_v.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from explain_prune.compress.labels import make_label
from explain_prune.compress.network import stack_inputs
from explain_prune.core import InputError
from explain_prune.data.cache import CachedSample, CacheReader, check_meta

log = logging.getLogger(__name__)


def split_of(key: str, val_fraction: float, seed: int = 0) -> str:
    """'val' or 'train' from a hash of the sample key (deterministic, order independent)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


class RelevanceDataset(Dataset):
    """Map-style dataset of cached samples: item i -> (x [C, N], a0 [N], rv [N], key), x being the
    `inputs` features stacked as channels."""

    def __init__(self, samples: Sequence[CachedSample], inputs: Sequence[str] = ("a0",)):
        self.samples = list(samples)
        self.inputs = tuple(inputs)
        self.lengths = [s.length for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
        s = self.samples[i]
        return stack_inputs(s.a0, s.features, self.inputs), s.a0, s.rv, f"{s.data}/{s.id}"


class PadCollate:
    """Pad a list of (x, a0, rv, key) to [B, C, N_max] / [B, N_max]; R_v* from R_v with `mask_ratio`."""

    def __init__(self, mask_ratio: float = 0.5):
        self.mask_ratio = float(mask_ratio)

    def __call__(self, items: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]]) -> dict[str, Any]:
        lengths = torch.tensor([a.numel() for _, a, _, _ in items], dtype=torch.long)
        n = int(lengths.max())
        x = torch.zeros(len(items), items[0][0].shape[0], n, dtype=torch.float32)
        a0 = torch.zeros(len(items), n, dtype=torch.float32)
        rv = torch.zeros(len(items), n, dtype=torch.float32)
        for i, (feats, a, r, _) in enumerate(items):
            x[i, :, : a.numel()] = feats
            a0[i, : a.numel()] = a
            rv[i, : r.numel()] = r
        mask = torch.arange(n)[None, :] < lengths[:, None]
        return {
            "x": x,
            "a0": a0,
            "rv": rv,
            "label": make_label(rv, mask, self.mask_ratio),
            "mask": mask,
            "lengths": lengths,
            "ids": [k for *_, k in items],
        }


class _EpochHolder:
    """Lightning calls `set_epoch` on `batch_sampler.sampler`; this carries it to the bucket sampler."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class BucketBatchSampler(Sampler[list[int]]):
    """Length-bucketed batches (see module doc).  Deterministic given (seed, epoch, rank, world)."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        bucket_batches: int = 16,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        even: bool = True,
        epoch_fn: Callable[[], int] | None = None,
    ):
        if batch_size < 1 or bucket_batches < 1:
            raise InputError(f"batch_size and bucket_batches must be >= 1, got {batch_size}, {bucket_batches}")
        self.lengths = list(lengths)
        self.batch_size = int(batch_size)
        self.bucket_batches = int(bucket_batches)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.even = bool(even)
        self.epoch_fn = epoch_fn
        self.sampler = _EpochHolder()

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return int(self.epoch_fn()) if self.epoch_fn is not None else self.sampler.epoch

    def _mine(self) -> list[list[int]]:
        """This rank's batches for the current epoch.

        The (seeded) sample order is the same on every rank; each rank takes every world_size-th
        sample of it (for training first cut to a multiple of world_size, so all ranks run the same
        number of steps; a rank never gets nothing), then buckets and batches its own samples.
        """
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        if self.world_size > 1 and order:
            if len(order) < self.world_size:
                order = (order * self.world_size)[: self.world_size]
            elif self.even:
                order = order[: len(order) - len(order) % self.world_size]
            order = order[self.rank :: self.world_size]
        bucket = self.batch_size * self.bucket_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), bucket):
            chunk = sorted(order[start : start + bucket], key=lambda i: (self.lengths[i], i))
            batches.extend(chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size))
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        # a generator: the epoch is read when the first batch is drawn, not when iter() is called
        yield from self._mine()

    def __len__(self) -> int:
        return len(self._mine())

    def padding_fraction(self) -> float:
        """Share of padded positions over one epoch of batches."""
        real = padded = 0
        for b in self._mine():
            lens = [self.lengths[i] for i in b]
            real += sum(lens)
            padded += max(lens) * len(lens)
        return 1.0 - real / max(padded, 1)


class RelevanceDataModule(L.LightningDataModule):
    """Train/val (A_v^0, R_v*) batches from `cache_dirs` (+ optional `eval_dirs` for validation only).

    cache_dirs: list of caches, each a directory, a list of part-directories, or an open CacheReader.
    expect_meta: identity every cache must have (model / modality; data=None allows several sources).
    eval_dirs: if given, validation uses *all* samples of these caches (e.g. longer sequences)
      instead of the held-out split.
    inputs: the compressor's input features (`FThetaConfig.inputs`); those beyond A_v^0 are read
      from the caches' per-token features.
    """

    def __init__(
        self,
        cache_dirs: Sequence[str | Path | Sequence[str | Path]] | str | Path,
        expect_meta: Mapping[str, Any] | None = None,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        bucket_batches: int = 16,
        num_workers: int = 0,
        only_correct: bool = True,
        mask_ratio: float = 0.5,
        seed: int = 0,
        pin_memory: bool = False,
        eval_dirs: Sequence[str | Path | Sequence[str | Path]] | str | Path | None = None,
        eval_expect_meta: Mapping[str, Any] | None = None,
        inputs: Sequence[str] = ("a0",),
    ):
        super().__init__()
        self.inputs = tuple(inputs)
        if not 0.0 < float(val_fraction) < 1.0:
            raise InputError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.cache_dirs = self._as_list(cache_dirs)
        self.eval_dirs = None if eval_dirs is None else self._as_list(eval_dirs)
        self.expect_meta = dict(expect_meta or {})
        self.eval_expect_meta = dict(eval_expect_meta if eval_expect_meta is not None else self.expect_meta)
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.bucket_batches = int(bucket_batches)
        self.num_workers = int(num_workers)
        self.only_correct = bool(only_correct)
        self.mask_ratio = float(mask_ratio)
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)
        self.train_set: RelevanceDataset | None = None
        self.val_set: RelevanceDataset | None = None
        self.cache_meta: dict[str, Any] = {}

    @property
    def features(self) -> tuple[str, ...]:
        """The per-token cache features the inputs need (A_v^0 is always read)."""
        return tuple(name for name in self.inputs if name != "a0")

    @staticmethod
    def _as_list(dirs: Any) -> list[Any]:
        if isinstance(dirs, (str, Path, CacheReader)):
            return [dirs]
        return list(dirs)

    def _read(self, dirs: list[Any], expect: Mapping[str, Any]) -> list[CachedSample]:
        samples: list[CachedSample] = []
        for entry in dirs:
            if isinstance(entry, CacheReader):  # already opened and verified by the caller
                for meta, directory in zip(entry.metas, entry.dirs):
                    check_meta(meta, expect, directory)
                absent = [name for name in self.features if name not in entry.features]
                if absent:
                    raise InputError(f"cache {entry} was opened without the per-token feature {absent[0]!r} the compressor reads")
                reader = entry
            else:
                reader = CacheReader(entry, expect, features=self.features)
            if not self.cache_meta:
                self.cache_meta = {k: reader.meta.get(k) for k in ("model", "model_id", "data", "modality")}
            # App. B: drop the samples the MLLM answered wrongly (unknown correctness is kept)
            chosen = [s for s in reader if not (self.only_correct and s.correct is False)]
            if not chosen:
                raise InputError(
                    f"cache {reader}: all {len(reader)} samples were answered incorrectly "
                    "(set datamodule.only_correct=false to train on them anyway)"
                )
            samples.extend(chosen)
        return samples

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None or self.val_set is not None:
            return
        need_train = stage in (None, "fit") or self.eval_dirs is None
        train, val = [], []
        if need_train:
            for s in self._read(self.cache_dirs, self.expect_meta):
                (val if split_of(f"{s.data}/{s.id}", self.val_fraction, self.split_seed) == "val" else train).append(s)
            if stage in (None, "fit") and not train:
                raise InputError("no training samples after the train/val split (cache too small?)")
        if self.eval_dirs is not None:
            val = self._read(self.eval_dirs, self.eval_expect_meta)
        if not val:
            raise InputError("no validation samples after the train/val split (raise val_fraction or add data)")
        self.train_set = RelevanceDataset(train, self.inputs) if train else None
        self.val_set = RelevanceDataset(val, self.inputs)
        log.info(
            "relevance data: %d train / %d val samples (lengths %d-%d)",
            len(train),
            len(val),
            min(self.val_set.lengths + (self.train_set.lengths if self.train_set else [])),
            max(self.val_set.lengths + (self.train_set.lengths if self.train_set else [])),
        )

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _epoch(self) -> int:
        """The fit loop's epoch counter (restored from a checkpoint before the first train iterator
        is built, unlike the `set_epoch` call that comes after it on resume)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_progress.current.processed)

    def _loader(self, dataset: RelevanceDataset, train: bool) -> DataLoader:
        rank, world = self._rank_world()
        sampler = BucketBatchSampler(
            dataset.lengths,
            self.batch_size,
            self.bucket_batches,
            shuffle=train,
            seed=self.seed,
            rank=rank,
            world_size=world,
            even=train,
            epoch_fn=self._epoch if train and getattr(self, "trainer", None) is not None else None,
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=PadCollate(self.mask_ratio),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise InputError("no training data (only an evaluation cache was set up)")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "setup() first"
        return self._loader(self.val_set, train=False)


__all__ = ["RelevanceDataModule", "RelevanceDataset", "BucketBatchSampler", "PadCollate", "split_of"]
