"""Hash split, length-bucketed batching, pad+mask collate, DDP sharding of the bucket sampler."""

import pytest
import torch

from explain_prune.compress.labels import make_label
from explain_prune.core import InputError
from explain_prune.compress.datamodule import (
    BucketBatchSampler,
    PadCollate,
    RelevanceDataModule,
    split_of,
)
from planted import write_planted_cache

EXPECT = {"model": "tiny_qwen2vl", "data": "synthetic", "modality": "image"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    write_planted_cache(d, 300, min_len=20, max_len=60, shard_size=64, correct_every=10)
    return d


def test_split_is_a_function_of_the_id():
    keys = [f"synthetic/s{i}" for i in range(2000)]
    a = [split_of(k, 0.1) for k in keys]
    assert a == [split_of(k, 0.1) for k in reversed(keys)][::-1]
    assert 0.07 < a.count("val") / len(a) < 0.13
    assert [split_of(k, 0.1, seed=1) for k in keys] != a


def test_datamodule_split_filter_and_batches(cache):
    dm = RelevanceDataModule([cache], EXPECT, batch_size=16, val_fraction=0.2, num_workers=0)
    dm.setup("fit")
    train_ids = {s.id for s in dm.train_set.samples}
    val_ids = {s.id for s in dm.val_set.samples}
    assert not train_ids & val_ids
    assert len(train_ids) + len(val_ids) == 270  # every 10th sample was answered wrongly
    dm2 = RelevanceDataModule([cache], EXPECT, batch_size=16, val_fraction=0.2, num_workers=0, only_correct=False)
    dm2.setup("fit")
    assert len(dm2.train_set) + len(dm2.val_set) == 300
    assert val_ids <= {s.id for s in dm2.val_set.samples}  # same split rule for the shared ids

    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "a0", "rv", "label", "mask", "lengths", "ids"}
    assert torch.equal(batch["x"][:, 0], batch["a0"])  # the paper's one input channel is A_v^0
    assert batch["mask"].sum(-1).tolist() == batch["lengths"].tolist()
    assert (batch["a0"][~batch["mask"]] == 0).all() and (batch["label"][~batch["mask"]] == 0).all()
    assert torch.allclose(batch["label"].sum(-1), torch.ones(len(batch["ids"])))
    assert torch.equal(batch["label"], make_label(batch["rv"], batch["mask"], 0.5))


def test_bucket_sampler_is_seeded_covers_everything_and_pads_little():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1300, 1901, (3000,), generator=g).tolist()
    s = BucketBatchSampler(lengths, batch_size=32, bucket_batches=16, seed=3)
    epoch0 = list(s)
    assert sorted(i for b in epoch0 for i in b) == list(range(3000))
    assert list(BucketBatchSampler(lengths, 32, 16, seed=3)) == epoch0
    s.set_epoch(1)
    assert list(s) != epoch0
    s.sampler.set_epoch(0)  # the hook Lightning calls (batch_sampler.sampler.set_epoch)
    assert list(s) == epoch0
    assert s.padding_fraction() < 0.05
    unbucketed = BucketBatchSampler(lengths, 32, bucket_batches=1, seed=3)
    assert unbucketed.padding_fraction() > 3 * s.padding_fraction()
    # DDP: disjoint, equal-sized shares
    shares = [list(BucketBatchSampler(lengths, 32, 16, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert len({len(x) for x in shares}) == 1
    flat = [i for share in shares for b in share for i in b]
    assert len(flat) == len(set(flat))
    # validation (even=False) keeps every sample; no rank is left without a batch
    val = [list(BucketBatchSampler(lengths[:5], 32, 16, shuffle=False, rank=r, world_size=4, even=False)) for r in range(4)]
    assert sorted(i for share in val for b in share for i in b) == [0, 1, 2, 3, 4]
    assert all(len(share) == 1 for share in val)
    tiny = [list(BucketBatchSampler(lengths[:2], 32, 16, rank=r, world_size=3)) for r in range(3)]
    assert all(len(share) == 1 for share in tiny)


def test_collate_pads_and_masks():
    items = [
        (torch.full((2, 3), 7.0), torch.ones(3), torch.arange(3.0), "a"),
        (torch.full((2, 5), 8.0), torch.ones(5), torch.arange(5.0), "b"),
    ]
    batch = PadCollate(0.5)(items)
    assert batch["a0"].shape == (2, 5) and batch["x"].shape == (2, 2, 5)
    assert batch["mask"].tolist() == [[True, True, True, False, False], [True] * 5]
    assert batch["x"][0, :, 3:].abs().sum() == 0 and (batch["x"][1] == 8.0).all()
    assert batch["ids"] == ["a", "b"]


def test_datamodule_refusals(cache, tmp_path):
    with pytest.raises(InputError, match="val_fraction"):
        RelevanceDataModule([cache], EXPECT, val_fraction=0.0)
    with pytest.raises(InputError, match="modality"):
        RelevanceDataModule([cache], {**EXPECT, "modality": "video"}).setup("fit")
    wrong = tmp_path / "wrong"
    write_planted_cache(wrong, 5, correct_every=1)
    with pytest.raises(InputError, match="incorrectly"):
        RelevanceDataModule([wrong], EXPECT).setup("fit")
