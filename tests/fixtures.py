"""Fixture writers shared by the benchmark tests: tiny datasets in each benchmark's released format
(VLMEvalKit TSVs with base64 images, parquet / TSV / JSON tables, gray-level videos and frame folders
whose pixel level encodes the frame index, a hand-written WordNet)."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

# --- image benchmarks (VLMEvalKit TSV) -----------------------------------------------------------


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (4, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def b64(color: tuple[int, int, int], size: tuple[int, int] = (4, 4)) -> str:
    return base64.b64encode(png_bytes(color, size)).decode("ascii")


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
CORRUPT_B64 = "@@not*base64@@" * 8  # > 64 chars, so it is image data, not a row reference
NOT_AN_IMAGE_B64 = base64.b64encode(b"this is not an image file at all, just text " * 3).decode("ascii")


def write_tsv(path: Path, rows: list[dict]) -> Path:
    """As VLMEvalKit dumps TSVs: pandas, tab-separated, every field quoted, NaN -> empty cell."""
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False, quoting=csv.QUOTE_ALL)
    return path


def mme_rows() -> list[dict]:
    q = " Please answer yes or no."
    return [
        dict(index=1, image=b64(RED), image_path="existence/1.png", question="Is there a red square?" + q,
             answer="Yes", category="existence"),
        dict(index=2, image="1", image_path="existence/1.png", question="Is there a blue square?" + q,
             answer="No", category="existence"),
        dict(index=3, image=b64(GREEN, (5, 3)), image_path="code/3.png", question="Does the code print 3?" + q,
             answer="yes", category="code_reasoning"),
        dict(index=4, image="3", image_path="code/3.png", question="Does the code print 4?" + q,
             answer="No", category="code_reasoning"),
        dict(index=5, image=CORRUPT_B64, image_path="x/5.png", question="?" + q, answer="Yes", category="count"),
        dict(index=6, image=NOT_AN_IMAGE_B64, image_path="x/6.png", question="?" + q, answer="No", category="count"),
        dict(index=7, image=b64(BLUE), image_path="x/7.png", question="No answer row?" + q, answer=np.nan,
             category="count"),
        dict(index=8, image="999", image_path="x/8.png", question="Dangling reference?" + q, answer="No",
             category="count"),
        dict(index=9, image=b64(BLUE), image_path="x/9.png", question="Is it blue?" + q, answer="Maybe",
             category="color"),
    ]


def pope_rows() -> list[dict]:
    """POPE rows: a multi-split question, a reused image, a row without a category (an error)."""
    return [
        dict(index=0, image=b64(RED), question="Is there a dog in the image?", answer="Yes",
             category="adversarial,popular,random", image_path="COCO_1.jpg"),
        dict(index=1, image="0", question="Is there a cat in the image?", answer="No", category="random",
             image_path="COCO_1.jpg"),
        dict(index=2, image=b64(RED), question="Is there a car in the image?", answer="No", category=np.nan),
    ]


def seedbench_rows() -> list[dict]:
    """SEED-Bench rows: two MCQs, the second reusing the first image."""
    return [
        dict(index=10, image=b64(RED), question="What is shown?", A="a square", B="a circle", C="a star",
             D="a line", answer="A", category="Scene Understanding"),
        dict(index=11, image="10", question="Which shape?", A="square", B="circle", C="star", D="line",
             answer="A", category="Instance Identity"),
    ]


def mmvet_rows() -> list[dict]:
    """MM-Vet rows: an <AND> answer, and a row without an answer (an error)."""
    return [
        dict(index="v0", image=b64(RED), question="What are the two numbers?", answer="3<AND>5",
             category="ocr,math"),
        dict(index="v1", image="v0", question="What is shown?", answer=np.nan, category="rec"),
    ]


# --- video benchmarks ----------------------------------------------------------------------------


def level(i: int) -> int:
    """Gray level of frame i in the fixture videos / frame folders."""
    return 10 + 8 * i


def gray_video(path: Path, num_frames: int = 10, fps: int = 4) -> Path:
    """An mp4/mkv whose frame i is a flat gray image of level(i) (lossless H.264)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"crf": "0"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), level(i), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


VIDEOMME_ROWS = [
    # video_id, duration, domain, sub_category, videoID, question_id, task_type, question, answer
    ("001", "short", "Knowledge", "Astronomy", "vid001", "001-1", "Counting Problem", "How many stars?", "B"),
    ("002", "medium", "Film & Television", "Animation", "vid002", "002-1", "OCR Problems", "What is written?", "D"),
    ("003", "long", "Knowledge", "Law", "vid003", "003-1", "Counting Problem", "How many judges?", "A"),
]


def write_videomme(root: Path) -> None:
    rows = []
    for vid, dur, dom, sub, video_id, qid, task, q, ans in VIDEOMME_ROWS:
        rows.append(dict(video_id=vid, duration=dur, domain=dom, sub_category=sub, url="https://x/" + video_id,
                         videoID=video_id, question_id=qid, task_type=task, question=q,
                         options=np.array([f"{k}. option {k.lower()}" for k in "ABCD"], dtype=object), answer=ans))
    (root / "videomme").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(root / "videomme" / "test-00000-of-00001.parquet")
    gray_video(root / "data" / "vid001.mp4", num_frames=10)
    gray_video(root / "data" / "vid002.MP4", num_frames=10)  # lmms-eval also tries .MP4; vid003 is missing


def write_mvbench(root: Path) -> None:
    js = root / "json"
    js.mkdir(parents=True)
    json.dump([
        {"video": "count1.mp4", "question": "How many times?", "candidates": ["1", "2", "3"], "answer": "2"},
        {"video": "missing.mp4", "question": "How many?", "candidates": ["1", "2"], "answer": "1"},
        {"video": "count1.mp4", "question": "Bad?", "candidates": ["1", "2"], "answer": "7"},
    ], open(js / "action_count.json", "w"))
    json.dump([
        {"video": "seq1.mp4", "question": "What next?", "candidates": ["sit", "stand"], "answer": "stand",
         "start": 0.5, "end": 2.0},
    ], open(js / "action_sequence.json", "w"))
    json.dump([
        {"video": "clip1", "question": "Who talks?", "candidates": ["Ross", "Rachel", "Joey"], "answer": "Joey",
         "start": 1.0, "end": 3.0},
    ], open(js / "episodic_reasoning.json", "w"))
    gray_video(root / "video" / "perception" / "videos" / "count1.mp4", num_frames=30)
    gray_video(root / "video" / "star" / "Charades_v1_480" / "seq1.mp4", num_frames=12, fps=4)
    frames = root / "video" / "tvqa" / "frames_fps3_hq" / "clip1"
    frames.mkdir(parents=True)
    for i in range(1, 13):  # 1-based %05d.jpg at 3 fps
        Image.fromarray(np.full((16, 16, 3), level(i), dtype=np.uint8)).save(frames / f"{i:05d}.jpg", quality=100)


def write_mmbench_video(root: Path) -> None:
    """MMBench-Video TSV: one answerable row, one with a missing video, one with an unknown dimension."""
    gray_video(root / "video" / "v1.mp4", num_frames=6)
    pd.DataFrame([
        dict(index=11, video="v1", video_path="./video/v1.mp4", question="What happens?", answer="A dog runs.",
             dimensions="['Event Recognition', 'Causal Reasoning']"),
        dict(index=12, video="v2", video_path="./video/v2.mp4", question="Why?", answer="Rain.",
             dimensions="['Causal Reasoning']"),
        dict(index=13, video="v1", video_path="./video/v1.mp4", question="Who?", answer="A man.",
             dimensions="['Telepathy']"),
    ]).to_csv(root / "MMBench-Video.tsv", sep="\t", index=False)


def write_nextqa(root: Path) -> None:
    (root / "MC").mkdir(parents=True)
    pd.DataFrame([
        dict(video=4010069381, frame_count=300, width=640, height=480, question=" why did the boy run ",
             answer=2, qid=7, type="CW", a0="to eat", a1="to sleep", a2="catch ball", a3="to sit", a4="to swim"),
        dict(video=555, frame_count=10, width=64, height=64, question="what is it", answer=0, qid=1, type="DO",
             a0="a", a1="b", a2="c", a3="d", a4="e"),
    ]).to_parquet(root / "MC" / "test-00000-of-00001.parquet")
    (root / "OE").mkdir()
    pd.DataFrame([
        dict(video=4010069381, qid=3, question="what is the dog doing", answer="playing", type="TC",
             additional_ref_answer="running"),
    ]).to_parquet(root / "OE" / "validation-00000-of-00001.parquet")
    gray_video(root / "NExTVideo" / "4010069381.mp4", num_frames=5)


def write_activitynet(root: Path) -> None:
    (root / "data").mkdir(parents=True)
    pd.DataFrame([
        dict(video_name="abc", question="is the man wearing a hat", answer="yes", question_id="v_abc_1", type=3),
        dict(video_name="def", question="what color is the car", answer="red", question_id="v_def_2", type=4),
        dict(video_name="ghi", question="where is he", answer="park", question_id="v_ghi_3", type=1),
    ]).to_parquet(root / "data" / "test-00000-of-00001.parquet")
    gray_video(root / "all_test" / "v_abc.mp4", num_frames=4)
    gray_video(root / "all_test" / "v_def.mkv", num_frames=4)  # .mkv is tried after .mp4 / .webm


# A hand-written WordNet in the database format NLTK reads:
#   entity -> animal -> {dog, cat};  entity -> artifact -> car;  (verb) move -> run.
# Wu-Palmer as NLTK computes it: depth(lcs) = max_depth(lcs) + 1, len_i = dist(s_i, lcs) + depth(lcs),
# wup = 2 depth / (len_1 + len_2):
#   wup(dog, cat) = 2*2 / (3 + 3) = 2/3;   wup(dog, car) = 2*1 / (3 + 3) = 1/3;   wup(dog, animal) = 4/5.
WN_NOUNS = [  # name, hypernym
    ("entity", None), ("animal", "entity"), ("dog", "animal"), ("cat", "animal"), ("artifact", "entity"), ("car", "artifact"),
]
WN_VERBS = [("move", None), ("run", "move")]


def write_wordnet(directory: Path) -> Path:
    directory.mkdir(parents=True)

    def data_file(entries, pos):
        hypos = {name: [c for c, h in entries if h == name] for name, _ in entries}

        def line(name, hyper, offsets):
            ptrs = ([("@", hyper)] if hyper else []) + [("~", c) for c in hypos[name]]
            ptr_text = " ".join(f"{s} {offsets[t]:08d} {pos} 0000" for s, t in ptrs)
            frames = " 00" if pos == "v" else ""
            return f"{offsets[name]:08d} 03 {pos} 01 {name} 0 {len(ptrs):03d} {ptr_text}{frames} | a {name}  \n"

        offsets = {name: 0 for name, _ in entries}
        pos_in_file = 0
        for name, hyper in entries:  # fixed-width fields: line lengths do not depend on offset values
            offsets[name] = pos_in_file
            pos_in_file += len(line(name, hyper, offsets).encode())
        text = "".join(line(name, hyper, offsets) for name, hyper in entries)
        index = "".join(f"{name} {pos} 1 0 1 0 {offsets[name]:08d}  \n" for name, _ in sorted(entries))
        return text, index

    for pos, suffix, entries in (("n", "noun", WN_NOUNS), ("v", "verb", WN_VERBS), ("a", "adj", []), ("r", "adv", [])):
        text, index = data_file(entries, pos) if entries else ("", "")
        (directory / f"data.{suffix}").write_text(text)
        (directory / f"index.{suffix}").write_text(index)
        (directory / f"{suffix}.exc").write_text("")
    (directory / "lexnames").write_text(
        "00\tadj.all\t3\n01\tadj.pert\t3\n02\tadv.all\t4\n03\tnoun.Tops\t1\n"
    )
    return directory
