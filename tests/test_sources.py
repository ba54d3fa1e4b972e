"""Training-data sources (data/sources) on tiny fixtures in the released layouts, and the App. B
correctness filter (data/correctness.py) on hand-checked strings."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from helpers import ROOT, write_video
from omegaconf import OmegaConf
from PIL import Image

from explain_prune.core import InputError, Sample, SampleError
from explain_prune.data.correctness import (
    extract_choice,
    is_correct,
    normalize_answer,
    token_f1,
)
from explain_prune.data.sources import build_source
from explain_prune.data.sources.common import waterfill
from explain_prune.data.sources.infinity_mm import InfinityMMSource
from explain_prune.data.sources.llava_video import LLaVAVideoSource
from explain_prune.synthetic.generator import SyntheticConfig, make_sample

MC_PROMPT = "Please provide your answer by stating the letter followed by the full option."


def conv(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"from": role, "value": value} for role, value in turns]


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def collect(source):
    items = list(source)
    assert len(items) == len(source)
    return items


def by_id(items):
    return {item.id: item for item in items}


# --- Infinity-MM ------------------------------------------------------------------------------------


def make_infinity_dir(root: Path) -> Path:
    """The extracted stage-4 layout: <folder>/<sub>/<key>.json (one record) + <key>.jpg/png."""
    bogus = "/share/baai/infinity_mm/images/0001.jpg"  # the publisher's absolute path: never exists here
    gpt4, synth = root / "gpt4" / "0000", root / "synth" / "0000"
    write_json(gpt4 / "a1.json", {"id": "10", "source": "llava", "image": bogus,
                                   "conversations": conv(("human", "<image>\nWhat is shown?"), ("gpt", "A red square."))})
    write_image(gpt4 / "a1.jpg", (200, 0, 0), (48, 32))
    write_json(gpt4 / "a2.json", {"id": "11", "image": bogus, "conversations": conv(
        ("gpt", "Hello."), ("human", "What color is it?\n<image>"), ("gpt", "Green."), ("human", "And the shape?"),
        ("gpt", "Round."))})
    write_image(gpt4 / "a2.png", (0, 200, 0))
    write_json(gpt4 / "a3.json", {"id": "12", "image": bogus,
                                   "conversations": conv(("human", "<image>\nWhere?"), ("gpt", "Here."))})  # no image file
    write_json(root / "gpt4" / "0001" / "a4.json", {"id": "13", "image": bogus,
                                                     "conversations": conv(("human", "<image>\n"), ("gpt", "x"))})
    write_image(root / "gpt4" / "0001" / "a4.jpg", (1, 2, 3))
    write_json(synth / "b1.json", {"id": "20", "image": bogus, "conversations": conv(
        ("human", "<image>\nWhich animal is it?\nA. dog\nB. cat\nC. bird\nAnswer with the option's letter."),
        ("gpt", "B"))})
    write_image(synth / "b1.png", (0, 0, 200))
    (synth / "b2.json").write_text('{"id": "21", "conversations": [')  # truncated file
    write_image(synth / "b2.png", (9, 9, 9))
    write_json(synth / "b3.json", {"id": "22", "conversations": conv(("human", "<image>\nWhat?"))})  # no answer
    write_image(synth / "b3.png", (9, 9, 9))
    return root


def test_infinity_mm_directory_layout(tmp_path):
    root = make_infinity_dir(tmp_path / "stage4")
    source = InfinityMMSource(root)
    items = collect(source)
    assert [i.id for i in items] == [
        "gpt4/0000/a1", "gpt4/0000/a2", "gpt4/0000/a3", "gpt4/0001/a4", "synth/0000/b1", "synth/0000/b2", "synth/0000/b3"]
    assert Counter(type(i).__name__ for i in items) == {"Sample": 3, "SampleError": 4}
    got = by_id(items)

    a1 = got["gpt4/0000/a1"]
    assert isinstance(a1, Sample) and a1.modality == "image"
    assert a1.question == "What is shown?" and a1.answer == "A red square."
    assert a1.images[0].size == (48, 32) and a1.images[0].mode == "RGB"
    assert a1.images[0].getpixel((5, 5))[0] > 150  # the sibling JPEG, not the record's absolute path
    assert a1.meta["part"] == "gpt4" and a1.meta["record_id"] == "10" and a1.meta["record_source"] == "llava"
    assert a1.meta["answer_type"] == "open_ended" and a1.meta["image_markers"] == 1

    a2 = got["gpt4/0000/a2"]  # leading gpt turn skipped; first human turn only; marker at the end
    assert (a2.question, a2.answer, a2.meta["num_turns"]) == ("What color is it?", "Green.", 2)
    assert a2.images[0].getpixel((0, 0)) == (0, 200, 0)

    b1 = got["synth/0000/b1"]
    assert b1.meta["answer_type"] == "multiple_choice"
    assert b1.meta["options"] == {"A": "dog", "B": "cat", "C": "bird"} and b1.meta["answer_letter"] == "B"
    assert b1.question.startswith("Which animal is it?\nA. dog\n")

    assert "image file not found" in got["gpt4/0000/a3"].reason and "a3.jpg" in got["gpt4/0000/a3"].reason
    assert "empty question" in got["gpt4/0001/a4"].reason
    assert "unreadable record" in got["synth/0000/b2"].reason
    assert "no reference answer" in got["synth/0000/b3"].reason

    again = collect(InfinityMMSource(root))  # same ids, order and content on a rebuild
    assert [(i.id, getattr(i, "question", None)) for i in again] == [(i.id, getattr(i, "question", None)) for i in items]


def test_infinity_mm_subsets_totals_and_limit(tmp_path):
    root = make_infinity_dir(tmp_path / "stage4")
    assert [i.id for i in InfinityMMSource(root, subsets=["synth"])] == ["synth/0000/b1", "synth/0000/b2", "synth/0000/b3"]
    picked = InfinityMMSource(root, group_totals={"gpt4": 2, "synth": 1}, seed=3)
    assert picked.part_counts() == {"gpt4": 2, "synth": 1}
    assert [i.id for i in picked] == [i.id for i in InfinityMMSource(root, group_totals={"gpt4": 2, "synth": 1}, seed=3)]
    assert len(InfinityMMSource(root, balanced_per_part=1)) == 2
    assert [i.id for i in InfinityMMSource(root, limit=2)] == ["gpt4/0000/a1", "gpt4/0000/a2"]
    with pytest.raises(InputError, match="unknown subset.*present: \\['gpt4', 'synth'\\]"):
        InfinityMMSource(root, subsets=["gpt-4"])
    with pytest.raises(InputError, match="at most one"):
        InfinityMMSource(root, balanced_per_part=1, group_totals={"gpt4": 1})


def test_infinity_mm_annotation_files(tmp_path):
    root = tmp_path / "llava"
    write_image(root / "images" / "x.png", (10, 20, 30))
    write_image(root / "images" / "y.jpg", (200, 200, 200), (20, 20))
    question = conv(("human", "<image>\nDescribe the image."), ("gpt", "A grey square."))
    write_json(root / "ann.json", [
        {"id": "1", "image": "images/x.png", "conversations": question},
        {"id": "1", "image": "images/y.jpg", "conversations": question},  # duplicate id
        {"image": "images/missing.png", "conversations": question},  # no id, missing file
        {"id": "4", "image": ["images/x.png", "images/y.jpg"], "conversations": conv(
            ("human", "<image>\n<image>\nCompare the two images."), ("gpt", "Different."))},
        {"id": "5", "conversations": question},  # text only
        {"id": "6", "image": "images/x.png"},  # no conversations
    ])
    (root / "more.jsonl").write_text(
        json.dumps({"id": "a", "image": str(root / "images" / "x.png"), "conversations": question}) + "\n"
        + "{not json\n" + "\n" + json.dumps(["a list"]) + "\n"
    )
    items = collect(InfinityMMSource(root, annotation=["ann.json", "more.jsonl"]))
    assert [i.id for i in items] == ["ann/1", "ann/1#2", "ann/row2", "ann/4", "ann/5", "ann/6", "more/a", "more/row1", "more/row2"]
    got = by_id(items)
    assert got["ann/1"].images[0].getpixel((0, 0)) == (10, 20, 30) and got["ann/1#2"].images[0].size == (20, 20)
    assert len(got["ann/4"].images) == 2 and got["ann/4"].question == "Compare the two images."
    assert got["ann/4"].meta["image_markers"] == 2
    assert "image file not found" in got["ann/row2"].reason
    assert "text-only" in got["ann/5"].reason
    assert "no 'conversations'" in got["ann/6"].reason
    assert isinstance(got["more/a"], Sample)  # absolute image path
    assert "invalid JSON" in got["more/row1"].reason and "must be a JSON object" in got["more/row2"].reason
    assert InfinityMMSource(root, annotation="ann.json").part_counts() == {"ann": 6}
    with pytest.raises(InputError, match="not found"):
        InfinityMMSource(root, annotation="nope.json")


# --- LLaVA-Video-178K -------------------------------------------------------------------------------


def mc_record(rid: str, video: str, source: str, answer_letter: str = "B") -> dict:
    question = f"<image>\nWhat does the person do {rid}?\nOptions:\nA. runs\nB. jumps\nC. sits\nD. waves\n{MC_PROMPT}"
    texts = {"A": "runs", "B": "jumps", "C": "sits", "D": "waves"}
    return {"id": rid, "data_source": source, "video": video,
            "conversations": conv(("human", question), ("gpt", f"{answer_letter}. {texts[answer_letter]}."))}


def oe_record(rid: str, video: str, source: str, answer: str = "Two.") -> dict:
    return {"id": rid, "data_source": source, "video": video,
            "conversations": conv(("human", f"<image>\nHow many people are there in clip {rid}?"), ("gpt", answer))}


def make_llava_video(root: Path) -> Path:
    """The LLaVA-Video-178K layout: <duration>_<source>/ annotation files + extracted videos."""
    (root / "academic_source" / "Charades").mkdir(parents=True)
    first = write_video(root / "academic_source" / "Charades" / "v1.mp4", num_frames=4, height=32, width=32)
    (root / "liwei_youtube_videos" / "y").mkdir(parents=True)
    shutil.copy(first, root / "liwei_youtube_videos" / "y" / "v2.mp4")
    (root / "0_30_s_nextqa" / "NextQA" / "NExTVideo" / "1006").mkdir(parents=True)  # tarball extracted in its dir
    shutil.copy(first, root / "0_30_s_nextqa" / "NextQA" / "NExTVideo" / "1006" / "v3.mp4")
    (root / "ActivityNet-QA").mkdir()
    shutil.copy(first, root / "ActivityNet-QA" / "v4.mp4")

    aca, yt, nq, an = "0_30_s_academic_v0_1", "30_60_s_youtube_v0_1", "0_30_s_nextqa", "2_3_m_activitynetqa"
    charades, youtube, nextqa, anet = "academic_source/Charades/v1.mp4", "liwei_youtube_videos/y/v2.mp4", \
        "NextQA/NExTVideo/1006/v3.mp4", "ActivityNet-QA/v4.mp4"
    write_json(root / aca / "0_30_s_academic_oe_v0_1_qa_processed.json",
               [oe_record("v1", charades, aca) for _ in range(8)])  # one video, eight questions: same id
    write_json(root / aca / "0_30_s_academic_mc_v0_1_qa_processed.json",
               [mc_record(f"m{i}", charades, aca, "ABCD"[i % 4]) for i in range(8)])
    write_json(root / aca / "0_30_s_academic_v0_1_cap_processed.json",
               [{"id": "c0", "data_source": aca, "video": charades,
                 "conversations": conv(("human", "<image>\nDescribe the video in detail."), ("gpt", "A long caption."))}])
    write_json(root / yt / "30_60_s_youtube_mc_v0_1_qa_processed.json", [mc_record(f"y{i}", youtube, yt) for i in range(3)])
    write_json(root / nq / "0_30_s_nextqa_mc_qa_processed.json", [mc_record(f"1006-{i}", nextqa, nq) for i in range(8)])
    write_json(root / nq / "0_30_s_nextqa_oe_qa_processed.json", [oe_record(f"n{i}", nextqa, nq) for i in range(2)])
    write_json(root / an / "2_3_m_activitynetqa_oe_qa_processed.json", [
        oe_record("a0", anet, an, "yes"), oe_record("a1", "ActivityNet-QA/missing.mp4", an),
        {"id": "a2", "data_source": an, "video": anet, "conversations": "not a list"}, oe_record("a3", anet, an)])
    return root


def test_llava_video_reads_the_release_layout(tmp_path):
    root = make_llava_video(tmp_path / "LLaVA-Video-178K")
    source = LLaVAVideoSource(root)
    assert source.part_counts() == {
        "0_30_s_academic_v0_1/mc": 8, "0_30_s_academic_v0_1/oe": 8, "0_30_s_nextqa/mc": 8, "0_30_s_nextqa/oe": 2,
        "2_3_m_activitynetqa/oe": 4, "30_60_s_youtube_v0_1/mc": 3}  # captions off by default
    items = collect(source)
    ids = [i.id for i in items]
    assert len(set(ids)) == len(ids) == 33
    assert ids[8:11] == ["0_30_s_academic_oe_v0_1_qa_processed/v1", "0_30_s_academic_oe_v0_1_qa_processed/v1#2",
                         "0_30_s_academic_oe_v0_1_qa_processed/v1#3"]
    got = by_id(items)

    mc = got["0_30_s_academic_mc_v0_1_qa_processed/m2"]
    assert mc.modality == "video" and Path(mc.video) == root / "academic_source/Charades/v1.mp4"
    assert mc.question.startswith("What does the person do m2?\nOptions:\nA. runs\n") and mc.question.endswith(MC_PROMPT)
    assert mc.answer == "C. sits."
    assert mc.meta["options"] == {"A": "runs", "B": "jumps", "C": "sits", "D": "waves"} and mc.meta["answer_letter"] == "C"
    assert (mc.meta["task"], mc.meta["duration"], mc.meta["group"], mc.meta["video_source"]) == \
        ("mc", "0_30_s", "llava_video", "academic")

    nq = got["0_30_s_nextqa_mc_qa_processed/1006-0"]
    assert Path(nq.video) == root / "0_30_s_nextqa/NextQA/NExTVideo/1006/v3.mp4"  # found under <data_source>/
    assert nq.meta["group"] == "nextqa" and nq.meta["answer_letter"] == "B"

    oe = got["2_3_m_activitynetqa_oe_qa_processed/a0"]
    assert oe.meta["answer_type"] == "open_ended" and oe.meta["group"] == "activitynetqa" and oe.meta["duration"] == "2_3_m"
    assert oe.question == "How many people are there in clip a0?"
    assert "video file not found" in got["2_3_m_activitynetqa_oe_qa_processed/a1"].reason
    assert "conversations" in got["2_3_m_activitynetqa_oe_qa_processed/a2"].reason
    assert sum(isinstance(i, SampleError) for i in items) == 2

    from explain_prune.data.video import (
        read_frames,  # the fixture is a real, decodable mp4
    )
    frames = read_frames(nq.video, 2)
    assert len(frames) == 2 and frames[0].size == (32, 32)

    captions = LLaVAVideoSource(root, tasks=["cap"])
    assert captions.part_counts() == {"0_30_s_academic_v0_1/cap": 1}


def test_llava_video_subsets_and_balanced_selection(tmp_path):
    root = make_llava_video(tmp_path / "lv")
    assert set(LLaVAVideoSource(root, subsets=["nextqa"]).part_counts()) == {"0_30_s_nextqa/mc", "0_30_s_nextqa/oe"}
    assert set(LLaVAVideoSource(root, subsets=["youtube", "2_3_m_activitynetqa"]).part_counts()) == {
        "30_60_s_youtube_v0_1/mc", "2_3_m_activitynetqa/oe"}
    assert set(LLaVAVideoSource(root, tasks=["mc"]).part_counts()) == {
        "0_30_s_academic_v0_1/mc", "0_30_s_nextqa/mc", "30_60_s_youtube_v0_1/mc"}
    with pytest.raises(InputError, match="unknown subset.*present: .*nextqa"):
        LLaVAVideoSource(root, subsets=["next_qa"])
    with pytest.raises(InputError, match="unknown task"):
        LLaVAVideoSource(root, tasks=["qa"])

    balanced = LLaVAVideoSource(root, balanced_per_part=3, seed=0)
    assert balanced.part_counts() == {
        "0_30_s_academic_v0_1/mc": 3, "0_30_s_academic_v0_1/oe": 3, "0_30_s_nextqa/mc": 3, "0_30_s_nextqa/oe": 2,
        "2_3_m_activitynetqa/oe": 3, "30_60_s_youtube_v0_1/mc": 3}
    ids = [i.id for i in balanced]
    assert ids == [i.id for i in LLaVAVideoSource(root, balanced_per_part=3, seed=0)]  # deterministic
    assert ids != [i.id for i in LLaVAVideoSource(root, balanced_per_part=3, seed=1)]  # the seed matters
    full_order = [e.id for e in LLaVAVideoSource(root).entries]
    assert ids == [i for i in full_order if i in set(ids)]  # kept rows stay in file order

    budget = LLaVAVideoSource(root, group_totals={"llava_video": 7, "nextqa": 8}, seed=0)
    assert budget.part_counts() == {  # 7 over (8, 8, 3): 3/2/2 by name order; 8 over (8, 2): oe gives 2, mc takes 6
        "0_30_s_academic_v0_1/mc": 3, "0_30_s_academic_v0_1/oe": 2, "30_60_s_youtube_v0_1/mc": 2,
        "0_30_s_nextqa/mc": 6, "0_30_s_nextqa/oe": 2}
    with pytest.raises(InputError, match="no rows"):
        LLaVAVideoSource(root, group_totals={"perceptiontest": 5})
    assert len(LLaVAVideoSource(root, limit=5)) == 5


def test_llava_video_parquet_and_merged_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = make_llava_video(tmp_path / "lv")
    records = json.loads((root / "0_30_s_nextqa" / "0_30_s_nextqa_mc_qa_processed.json").read_text())
    pq.write_table(pa.Table.from_pylist(records), root / "0_30_s_nextqa" / "0_30_s_nextqa_mc-00000-of-00001.parquet")
    from_json = collect(LLaVAVideoSource(root, annotation="0_30_s_nextqa/0_30_s_nextqa_mc_qa_processed.json"))
    from_parquet = collect(LLaVAVideoSource(root, annotation="0_30_s_nextqa/0_30_s_nextqa_mc-00000-of-00001.parquet"))
    assert [(s.question, s.answer, s.video, s.meta["options"]) for s in from_parquet] == \
        [(s.question, s.answer, s.video, s.meta["options"]) for s in from_json]

    # a merged jsonl without task tokens in its name: the task comes from each record
    merged = [mc_record("m", "academic_source/Charades/v1.mp4", "0_30_s_academic_v0_1"),
              oe_record("o", "NextQA/NExTVideo/1006/v3.mp4", "0_30_s_nextqa")]
    (root / "merged.jsonl").write_text("\n".join(json.dumps(r) for r in merged) + "\n")
    items = collect(LLaVAVideoSource(root, annotation="merged.jsonl"))
    assert [(i.meta["part"], i.meta["answer_type"]) for i in items] == [
        ("0_30_s_academic_v0_1/mc", "multiple_choice"), ("0_30_s_nextqa/oe", "open_ended")]


def test_waterfill_splits_equally_within_capacity():
    assert waterfill(10, {"a": 1, "b": 5, "c": 5}) == {"a": 1, "b": 5, "c": 4}
    assert waterfill(7, {"x": 8, "y": 8, "z": 3}) == {"x": 3, "y": 2, "z": 2}
    assert waterfill(100, {"x": 2, "y": 3}) == {"x": 2, "y": 3}
    assert waterfill(2, {"x": 5, "y": 5, "z": 5}) == {"x": 1, "y": 1, "z": 0}


# --- build_source and the configs -------------------------------------------------------------------


def test_build_source_dispatch_and_errors(tmp_path):
    with pytest.raises(InputError, match=r"unknown data source 'coco' \(allowed: infinity_mm, llava_video, synthetic\)"):
        build_source({"source": "coco"})
    with pytest.raises(InputError, match=r"data.balance_per_part: unknown key \(allowed: auto_generate, generator, limit, "):
        build_source({"source": "synthetic", "limit": 2, "balance_per_part": 3})
    with pytest.raises(InputError, match="not a directory"):
        build_source({"source": "llava_video", "root": str(tmp_path / "absent")})
    with pytest.raises(InputError, match="data.limit"):
        build_source({"source": "synthetic", "limit": None})
    only_oe = write_json(tmp_path / "lv" / "0_30_s_x" / "0_30_s_x_oe_qa_processed.json", []).parents[1]
    with pytest.raises(InputError, match="selected no rows"):
        build_source({"source": "llava_video", "root": str(only_oe), "tasks": ["mc"]})
    root = make_infinity_dir(tmp_path / "im")
    with pytest.raises(InputError, match="no rows; groups present: \\['gpt4'\\]"):
        build_source({"source": "infinity_mm", "root": str(root), "subsets": ["gpt4"], "group_totals": {"synth": 2}})

    synthetic = build_source({"name": "synthetic", "source": "synthetic", "limit": 3, "seed": 5, "strict": False})
    samples = collect(synthetic)
    expected = [make_sample(SyntheticConfig(), 5, i) for i in range(3)]
    assert [(s.id, s.question, s.answer) for s in samples] == [(s.id, s.question, s.answer) for s in expected]
    assert all(s.answer and s.images for s in samples)
    video = build_source({"source": "synthetic", "limit": 1, "generator": {"frames": 4}})
    assert next(iter(video)).modality == "video"
    with pytest.raises(InputError, match="unknown generator option"):
        build_source({"source": "synthetic", "limit": 1, "generator": {"colour": 1}})


def test_data_configs_point_at_the_fixtures(tmp_path, monkeypatch):
    make_infinity_dir(tmp_path / "Infinity-MM" / "stage4")
    make_llava_video(tmp_path / "LLaVA-Video-178K")
    monkeypatch.setenv("EXPLAIN_PRUNE_DATA", str(tmp_path))
    conf = ROOT / "conf" / "data"

    images = build_source(OmegaConf.load(conf / "infinity_mm.yaml"))
    assert len(images) == 7 and images.root == tmp_path / "Infinity-MM" / "stage4"

    videos = build_source(OmegaConf.load(conf / "llava_video.yaml"))  # App. B totals exceed the fixture: all kept
    assert set(videos.describe()["group_totals"]) == {"llava_video", "nextqa", "activitynetqa"}
    assert len(videos) == 33

    synthetic_cfg = OmegaConf.load(conf / "synthetic.yaml")
    assert synthetic_cfg.name == "synthetic" and synthetic_cfg.strict is False
    synthetic = build_source(synthetic_cfg)
    assert len(synthetic) == synthetic_cfg.limit
    for name in ("infinity_mm", "llava_video", "synthetic"):
        cfg = OmegaConf.load(conf / f"{name}.yaml")
        assert cfg.name == name and cfg.source == name and cfg.limit in (None, 512) and "seed" in cfg


# --- the correctness filter -------------------------------------------------------------------------

OPTIONS = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"), ("(B)", "B"), ("B. cat", "B"), ("The answer is B", "B"), ("The answer is B.", "B"), ("b", "B"),
    ("[D]", "D"), ("B) A dog", "B"), ("Answer: (C) bird", "C"), ("option D", "D"), ("I think it is C, the bird", "C"),
    ("It is a fish.", "D"), ("A cat", "B"), ("A dog", "A"), ("A. cat", "A"), ("A because it barks", "A"),
    ("A or B", None), ("", None), ("Cannot determine the answer", None), ("a horse", None),
])
def test_extract_choice(prediction, letter):
    assert extract_choice(prediction, OPTIONS) == letter


def test_is_correct_multiple_choice_uses_the_reference_letter():
    meta = {"answer_type": "multiple_choice", "options": OPTIONS, "answer_letter": "B"}
    assert is_correct("B. cat", "B. cat.", meta)
    assert is_correct("The answer is (B).", "B", meta)
    assert not is_correct("A", "B", meta)
    assert not is_correct("A or B", "B", meta)
    # no answer_letter in meta: taken from the reference ("E. training." form) or its option text
    assert is_correct("(C)", "C. bird.", {"options": OPTIONS})
    assert is_correct("C", "bird", {"options": OPTIONS})


@pytest.mark.parametrize("prediction, reference, meta, expected", [
    ("Two.", "2", {}, True),                                     # number word <-> digit
    ("There are two dogs.", "2", {}, True),                      # whole-word span
    ("12", "2", {}, False),                                      # not a whole word
    ("The Eiffel Tower!", "eiffel tower", {}, True),             # case, article, punctuation
    ("1,000", "1000", {}, True),
    ("3.5 meters", "3.5 meters", {}, True),
    ("35 meters", "3.5 meters", {}, False),                      # the decimal point is kept
    ("Yes, it is.", "Yes", {}, True),                            # VLMEvalKit yes/no extraction
    ("No.", "yes", {}, False),
    ("yes and no", "no", {}, False),                             # Unknown is wrong
    ("circle", "circle", {"answers": ["circle", "square"]}, True),
    ("a red circle", "circle", {"answers": ["circle", "square"]}, True),
    ("circle or square", "circle", {"answers": ["circle", "square"]}, False),  # two candidates named
    ("square", "circle", {"answers": ["circle", "square"]}, False),
    ("I see a small red object near the top left corner of the grey board", "red", {}, True),  # 12 words
    ("and 10 will ! vision assistant following Red Select Colour system , 10 Given Tree", "red", {}, False),  # 13
    ("The man plays the guitar on a bench.", "A man is playing the guitar on a bench.", {}, True),  # F1 0.73
    ("A dog runs.", "A man is playing the guitar on a bench.", {}, False),
    ("A dog runs.", "A man is playing the guitar on a bench.", {"f1_threshold": 0.0}, True),
])
def test_is_correct_open_answers(prediction, reference, meta, expected):
    assert is_correct(prediction, reference, meta) is expected


def test_normalisation_and_f1():
    assert normalize_answer("The Two dogs, 1,000 times; 3.5 m.") == "2 dogs 1000 times 3.5 m"
    assert normalize_answer("None of them") == "0 of them"
    assert token_f1("man plays guitar", "man is playing guitar") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_synthetic_config_is_one_rule_for_source_fit_and_benchmark():
    """The source, the benchmark and synthetic_fit build the same SyntheticConfig from the same YAML
    node, with YAML lists turned into the dataclass's tuples (`scale` included)."""
    from omegaconf import OmegaConf

    from explain_prune.benchmarks.synthetic import SyntheticBenchmark
    from explain_prune.synthetic.generator import SyntheticConfig, synthetic_config

    node = OmegaConf.create({"grid": 4, "scale": [0.6, 0.8], "question_types": ["color", "shape"]})
    expected = SyntheticConfig(grid=4, scale=(0.6, 0.8), question_types=("color", "shape"))
    assert synthetic_config(node) == expected  # what synthetic_fit reads (a DictConfig)
    assert build_source({"source": "synthetic", "limit": 2, "generator": node}).config == expected
    assert SyntheticBenchmark(limit=2, generator=OmegaConf.to_container(node)).config == expected
    with pytest.raises(InputError, match="unknown generator option"):
        synthetic_config({"grids": 4})
