"""The relevance cache: atomic shards, resume after a kill, SLURM parts, and every refusal."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from explain_prune.core import InputError
from explain_prune.data.cache import CacheReader, CacheWriter, make_meta, read_meta

META = make_meta("tiny_qwen2vl", "synthetic", "image", model_id="x", data_source="gen", config={"k": 1})
EXPECT = {"model": "tiny_qwen2vl", "data": "synthetic", "modality": "image"}


def sample(i: int):
    g = torch.Generator().manual_seed(i)
    n = 5 + i % 7
    return f"id{i:03d}", torch.rand(n, generator=g), torch.rand(n, generator=g), (1, 1, n), i % 3 != 0, f"ans{i}"


def write(directory, ids, shard_size=4, **kw):
    with CacheWriter(directory, META, shard_size=shard_size, **kw) as w:
        for i in ids:
            sid, a0, rv, grid, correct, answer = sample(i)
            if sid not in w.done_ids():
                w.add(sid, a0, rv, grid, correct, answer)
    return w


def contents(reader: CacheReader):
    return [(s.id, s.a0.tolist(), s.rv.tolist(), s.grid, s.correct, s.answer) for s in reader]


def shards(directory):
    return sorted(p for p in directory.iterdir() if p.suffix == ".safetensors")


def test_roundtrip_layout_and_meta(tmp_path):
    write(tmp_path, range(10))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        ".lock-part000of001",  # the writer's advisory lock file stays (deleting it would race a new writer)
        "index-part000of001.jsonl",
        "meta.json",
        "part000of001-00000.safetensors",
        "part000of001-00001.safetensors",
        "part000of001-00002.safetensors",
    ]
    meta = read_meta(tmp_path)
    assert meta["model"] == "tiny_qwen2vl" and meta["config_hash"] and meta["versions"]["torch"]
    tensors = load_file(str(tmp_path / "part000of001-00000.safetensors"))
    assert tensors["a0"].dtype == torch.float32 and tensors["offsets"].tolist()[0] == 0
    reader = CacheReader(tmp_path, EXPECT)
    assert len(reader) == 10
    for s in reader:
        i = int(s.id[2:])
        _, a0, rv, grid, correct, answer = sample(i)
        assert torch.equal(s.a0, a0) and torch.equal(s.rv, rv)
        assert s.grid == grid and s.correct == correct and s.answer == answer
    line = json.loads((tmp_path / "index-part000of001.jsonl").read_text().splitlines()[0])
    assert {"id", "shard", "offset", "length", "grid", "correct", "answer"} <= set(line)


def test_rerun_skips_indexed_ids(tmp_path):
    write(tmp_path, range(6))
    before = shards(tmp_path)
    w = write(tmp_path, range(6))
    assert shards(tmp_path) == before
    assert len(w.done_ids()) == 6
    assert not CacheWriter(tmp_path, META).add(*sample(0))


def test_kill_mid_write_then_resume_is_identical(tmp_path):
    reference = tmp_path / "ref"
    write(reference, range(20))
    expected = contents(CacheReader(reference, EXPECT))

    cache = tmp_path / "cache"
    write(cache, range(12))  # 3 complete shards of 4
    files = shards(cache)
    # (1) a shard truncated after it was indexed (e.g. no fsync on the storage)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])
    # (2) a killed writer's temp file, (3) an orphan shard renamed but never indexed,
    # (4) a half-written index line
    (cache / ".part000of001-00003.safetensors.tmp-999").write_bytes(b"partial")
    save_file({"a0": torch.ones(3), "rv": torch.ones(3), "offsets": torch.tensor([0, 3])}, str(cache / "part000of001-00007.safetensors"))
    with open(cache / "index-part000of001.jsonl", "a") as fh:
        fh.write('{"id": "id099", "shard": "part000of0')

    with pytest.raises(InputError, match="part000of001-00001.safetensors"):
        CacheReader(cache, EXPECT)

    write(cache, range(20))  # resume: repairs, rewrites the lost shard's samples, adds the rest
    assert contents(CacheReader(cache, EXPECT)) == expected
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]
    assert not (cache / "part000of001-00007.safetensors").exists()
    assert (cache / "index-part000of001.jsonl").read_bytes().endswith(b"\n")


def test_reader_ignores_interrupted_leftovers(tmp_path):
    write(tmp_path, range(8))
    (tmp_path / ".part000of001-00009.safetensors.tmp-1").write_bytes(b"x")
    with open(tmp_path / "index-part000of001.jsonl", "a") as fh:
        fh.write('{"id": "half')
    assert len(CacheReader(tmp_path, EXPECT)) == 8


def test_corrupt_bytes_detected(tmp_path):
    write(tmp_path, range(4))
    path = shards(tmp_path)[0]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same size, flipped bits in the payload
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=path.name):
        CacheReader(tmp_path, EXPECT)


def test_slurm_parts_do_not_collide_and_merge(tmp_path):
    one = tmp_path / "one"
    for part in range(3):
        with CacheWriter(one, META, shard_id=part, num_shards=3, shard_size=2) as w:
            for i in range(part, 15, 3):
                w.add(*sample(i))
    assert len({p.name for p in shards(one)}) == len(shards(one))
    assert all(p.name.startswith(("part000of003", "part001of003", "part002of003")) for p in shards(one))
    merged = CacheReader(one, EXPECT)
    # parts written to separate directories merge to the same content
    dirs = []
    for part in range(3):
        d = tmp_path / f"p{part}"
        with CacheWriter(d, META, shard_id=part, num_shards=3, shard_size=2) as w:
            for i in range(part, 15, 3):
                w.add(*sample(i))
        dirs.append(d)
    assert contents(CacheReader(dirs, EXPECT)) == contents(merged)
    assert len(merged) == 15


def test_refusals(tmp_path):
    with pytest.raises(InputError, match="not found"):
        CacheReader(tmp_path / "nope", EXPECT)
    (tmp_path / "nometa").mkdir()
    with pytest.raises(InputError, match="meta.json"):
        CacheReader(tmp_path / "nometa", EXPECT)

    other = tmp_path / "other"
    with CacheWriter(other, make_meta("qwen2vl", "synthetic", "image")) as w:
        w.add(*sample(1))
    with pytest.raises(InputError, match="model='qwen2vl'.*model='tiny_qwen2vl'"):
        CacheReader(other, EXPECT)
    with pytest.raises(InputError, match="modality"):
        CacheReader(other, {"model": "qwen2vl", "modality": "video"})
    with pytest.raises(InputError, match=r"config_hash=.* was asked \(built with other relevance / frame settings: set cache_dir"):
        CacheWriter(other, make_meta("qwen2vl", "synthetic", "image", config={"changed": True}))

    nothing = tmp_path / "nothing"
    CacheWriter(nothing, META).close()  # a writer that cached nothing leaves no meta.json
    with pytest.raises(InputError, match=r"not a relevance cache \(no meta.json\)"):
        CacheReader(nothing, EXPECT)

    with CacheWriter(tmp_path / "w", META) as writer:
        with pytest.raises(InputError, match="non-finite"):
            writer.add("bad", torch.tensor([1.0, float("nan")]), torch.ones(2))
        with pytest.raises(InputError, match="grid"):
            writer.add("g", torch.ones(2), torch.ones(2), grid=(1, 2))


def test_nan_in_a_cached_vector_names_the_sample(tmp_path):
    write(tmp_path, range(8))
    index = [json.loads(x) for x in (tmp_path / "index-part000of001.jsonl").read_text().splitlines()]
    victim = index[5]
    path = tmp_path / victim["shard"]
    tensors = load_file(str(path))
    tensors["rv"][victim["offset"] + 1] = float("inf")
    save_file(tensors, str(path), metadata={"format": "1"})
    # keep size/hash consistent so the finiteness check (not the checksum) is what fires
    size, lines = path.stat().st_size, []
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for e in index:
        if e["shard"] == victim["shard"]:
            e["shard_bytes"], e["shard_sha256"] = size, digest
        lines.append(json.dumps(e) + "\n")
    (tmp_path / "index-part000of001.jsonl").write_text("".join(lines))
    with pytest.raises(InputError, match=f"rv of sample '{victim['id']}'"):
        CacheReader(tmp_path, EXPECT)
