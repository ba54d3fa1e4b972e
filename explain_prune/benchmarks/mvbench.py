"""MVBench (Li et al. 2024): 20 temporal tasks × 200 multiple-choice questions.

Data (`root`, env `MVBENCH_ROOT`): the HF `OpenGVLab/MVBench` release — `json/<task>.json` per task,
each a list of `{video, question, candidates, answer[, start, end]}` where `answer` is the *text*
of one candidate (its letter is its position: A, B, ...), and the videos unzipped per source dataset.
Two layouts (`layout`):

* `vlmevalkit` (default; the `main` branch, as VLMEvalKit's `MVBench` reads it — the toolkit the
  paper used): videos under `<root>/video/<prefix>/<video>` with VLMEvalKit's prefixes (e.g.
  `star/Charades_v1_480`); also `<root>/video/data0613/<prefix>/` (the June-13 supplement). The five
  *bound* tasks (action_sequence, action_prediction, object_interaction, action_localization,
  episodic_reasoning) are cut to [start, end] seconds: the sample carries `meta["start"]`,
  `meta["end"]` for the adapter. `episodic_reasoning` (TVQA) is a folder of 1-based `%05d.jpg`
  frames at 3 fps; those frames are decoded here with VLMEvalKit's `get_index` rule (below) and
  passed as the sample's frame list, so this task needs `num_frames`.
* `lmms_eval` (the `video` branch as lmms-eval's `DATA_LIST` reads it): `<root>/<folder>/<video>`
  with pre-cut segment folders (e.g. `star/Charades_segment`), so no bounds are applied.

Prompt `vlmeval_mvbench` (VLMEvalKit e8e78f05 vlmeval/dataset/mvbench.py `build_prompt` L352-370): the
message is `SYS` (a system-role text ending in "\n"), the video, `qa_template` ("Question: <q>\n
Options:\n(A) <c0>\n(B) <c1>..." stripped), "\nOnly give the best option." and "Best option:(" (an
assistant-role text).  The models concatenate the texts of the message into the user turn, in order
and with nothing between them (the roles are not used): SYS is the sample's `preamble` — before the
video for Qwen2-VL and VILA, after it for LLaVA-OneVision, whose video path puts all text after the
video — and the question ends in "...Only give the best option.Best option:(".

Frames: rule `centers` (segment centres, VLMEvalKit `get_index`; `data.video.frame_indices`): with
n frames over frame indices [s, e] (s = max(first, round(start·fps)), e = min(round(end·fps), last);
whole video without a bound), seg = (e − s)/n and index_i = int(s + seg/2 + round(seg·i)). The
adapters apply the bounds through `data.video.read_sample_frames`, with the video's average fps.

Answer rule (`answer_rule`, recorded as the extraction id):
* `vlmevalkit_check_ans` (default; VLMEvalKit e8e78f05 vlmeval/dataset/mvbench.py `evaluate` ->
  utils/mvbench.py `check_ans_with_model` with exact matching): the answer's first space-separated
  token, lower-cased, with "." removed, is a substring of the true option "(x)", or "(x)" is a
  substring of that token; otherwise VLMEvalKit `can_infer` over the candidates
  (`extract.extract_option_letter`) must give the true letter. The substring test also credits "",
  "(", ")" and "." — the reference's behaviour, reproduced because its numbers are the ones compared.
* `first_token_can_infer` (the project's stricter rule): the first whitespace token with
  brackets/punctuation stripped, if it is an option letter; otherwise `can_infer`. An empty or
  bracket-only answer is wrong.

Scoring (VLMEvalKit `get_dimension_rating`): accuracy in % per task and `overall` = correct / all
questions; also `task_mean` (mean of the task accuracies; equal to overall on the full 20×200
release) and `overall_answered` (lmms-eval's denominator: questions with a non-empty answer).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image

from explain_prune.benchmarks.base import Record
from explain_prune.benchmarks.extract import extract_option_letter
from explain_prune.benchmarks.video_base import (
    RowError,
    VideoBenchmark,
    list_field,
    percent,
    read_table,
    text_field,
)
from explain_prune.core import InputError, Sample
from explain_prune.data.video import frame_indices
from explain_prune.benchmarks.base import BENCHMARKS

# task (json stem): (VLMEvalKit name, VLMEvalKit folder under video/, stored as, bound, lmms-eval folder)
TASKS: dict[str, tuple[str, str, str, bool, str]] = {
    "action_sequence": ("Action Sequence", "star/Charades_v1_480", "video", True, "star/Charades_segment"),
    "action_prediction": ("Action Prediction", "star/Charades_v1_480", "video", True, "star/Charades_segment"),
    "action_antonym": ("Action Antonym", "ssv2_video", "video", False, "ssv2_video_mp4"),
    "fine_grained_action": ("Fine-grained Action", "Moments_in_Time_Raw/videos", "video", False, "Moments_in_Time_Raw/videos"),
    "unexpected_action": ("Unexpected Action", "FunQA_test/test", "video", False, "FunQA_test/test"),
    "object_existence": ("Object Existence", "clevrer/video_validation", "video", False, "clevrer/video_validation"),
    "object_interaction": ("Object Interaction", "star/Charades_v1_480", "video", True, "star/Charades_segment"),
    "object_shuffle": ("Object Shuffle", "perception/videos", "video", False, "perception/videos"),
    "moving_direction": ("Moving Direction", "clevrer/video_validation", "video", False, "clevrer/video_validation"),
    "action_localization": ("Action Localization", "sta/sta_video", "video", True, "sta/sta_video_segment"),
    "scene_transition": ("Scene Transition", "scene_qa/video", "video", False, "scene_qa/video"),
    "action_count": ("Action Count", "perception/videos", "video", False, "perception/videos"),
    "moving_count": ("Moving Count", "clevrer/video_validation", "video", False, "clevrer/video_validation"),
    "moving_attribute": ("Moving Attribute", "clevrer/video_validation", "video", False, "clevrer/video_validation"),
    "state_change": ("State Change", "perception/videos", "video", False, "perception/videos"),
    "fine_grained_pose": ("Fine-grained Pose", "nturgbd", "video", False, "nturgbd_convert"),
    "character_order": ("Character Order", "perception/videos", "video", False, "perception/videos"),
    "egocentric_navigation": ("Egocentric Navigation", "vlnqa", "video", False, "vlnqa"),
    "episodic_reasoning": ("Episodic Reasoning", "tvqa/frames_fps3_hq", "frame", True, "tvqa/video_fps3_hq_segment"),
    "counterfactual_inference": ("Counterfactual Inference", "clevrer/video_validation", "video", False, "clevrer/video_validation"),
}
LAYOUTS = ("vlmevalkit", "lmms_eval")
FRAME_FOLDER_FPS = 3  # TVQA frames are stored at 3 fps

SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, "
    "the detail and movement of objects, and the action and pose of persons. "
    "Based on your observations, select the best option that accurately addresses the question."
)
CLOSING = "\nOnly give the best option."
ANSWER_PREFIX = "Best option:("  # VLMEvalKit's assistant-role text, part of the user turn as the models read it


def mvbench_prompt(question: str, candidates: Sequence[str]) -> tuple[str, str]:
    """(preamble, question) of VLMEvalKit's MVBench message (see the module doc)."""
    lines = [f"Question: {question}", "Options:"]
    lines += [f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(candidates)]
    return SYSTEM + "\n", "\n".join(lines).rstrip() + CLOSING + ANSWER_PREFIX


def read_frame_folder(
    directory: Path, num_frames: int, bound: tuple[float, float] | None, rule: str = "centers"
) -> list[Image.Image]:
    """Frames of a 1-based `%05d.jpg` folder at 3 fps, chosen like VLMEvalKit `MVBench.read_frame`
    (frames numbered 1 .. the number of entries in the folder)."""
    try:
        indices = frame_indices(len(os.listdir(directory)), num_frames, rule, FRAME_FOLDER_FPS, bound, first_idx=1)
    except InputError as err:
        raise RowError(f"frame folder {directory}: {err}") from err
    frames = []
    for idx in indices:
        path = directory / f"{idx:05d}.jpg"
        try:
            with Image.open(path) as img:
                frames.append(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:
            raise RowError(f"cannot read frame {path}: {type(err).__name__}: {err}") from err
    return frames


_STRIP = "()[]{}.,:;!*#'\""


ANSWER_RULES = {"vlmevalkit_check_ans": "vlmeval_mvbench_check_ans", "first_token_can_infer": "mvbench_first_token_can_infer"}


def check_ans(prediction: str, letter: str) -> bool:
    """VLMEvalKit's substring test of the first token against the true option "(x)"."""
    token = prediction.lower().strip().split(" ")[0]
    option = f"({letter.lower()})"
    return token.replace(".", "") in option or option in token


def first_token_letter(prediction: str, letters: Sequence[str]) -> str | None:
    """The option letter written as the first token ("A", "(a)", "B)", "C." ...), else None."""
    tokens = str(prediction).split()
    if not tokens:
        return None
    token = tokens[0].strip(_STRIP).upper()
    return token if token in letters else None


@BENCHMARKS.register("mvbench")
class MVBench(VideoBenchmark):
    env_var = "MVBENCH_ROOT"
    prompt_id = "vlmeval_mvbench"
    extraction_id = ANSWER_RULES["vlmevalkit_check_ans"]
    frame_sampling = "centers"
    max_new_tokens = 16

    def __init__(
        self,
        root=None,
        layout: str = "vlmevalkit",
        tasks: Sequence[str] | None = None,
        answer_rule: str = "vlmevalkit_check_ans",
        **kwargs: Any,
    ):
        if kwargs.get("data_file") not in (None, ""):
            raise InputError("mvbench reads json/<task>.json for each task; select tasks with `tasks`, not data_file")
        if answer_rule not in ANSWER_RULES:
            raise InputError(f"mvbench: unknown answer_rule {answer_rule!r} (known: {', '.join(ANSWER_RULES)})")
        super().__init__(root, **kwargs)
        self.answer_rule = answer_rule
        self.extraction_id = ANSWER_RULES[answer_rule]
        if layout not in LAYOUTS:
            raise InputError(f"mvbench: unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
        self.layout = layout
        selected = list(TASKS) if tasks in (None, "all") else [str(t) for t in tasks]
        unknown = sorted(set(selected) - set(TASKS))
        if unknown:
            raise InputError(f"mvbench: unknown task(s) {unknown} (known: {', '.join(TASKS)})")
        self.tasks = selected

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "layout": self.layout, "tasks": len(self.tasks)}

    def records(self) -> Iterator[dict[str, Any]]:
        json_dir = self.root / "json"
        missing = [f"json/{t}.json" for t in self.tasks if not (json_dir / f"{t}.json").is_file()]
        if missing:
            raise InputError(
                f"MVBench: data file(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} not found "
                f"in {self.root} (point benchmark.root at the OpenGVLab/MVBench directory)"
            )
        for task in self.tasks:
            for i, rec in enumerate(read_table(json_dir / f"{task}.json")):
                yield {**rec, "_task": task, "_position": i}

    def record_id(self, rec: dict[str, Any], position: int) -> str:
        return f"{rec['_task']}/{rec['_position']:04d}"

    def _bound(self, rec: dict[str, Any], task: str) -> tuple[float, float] | None:
        if self.layout != "vlmevalkit" or not TASKS[task][3]:
            return None
        try:
            start, end = float(rec["start"]), float(rec["end"])
        except (KeyError, TypeError, ValueError) as err:
            raise RowError(f"bound task {task} record lacks numeric start/end ({err})") from err
        if not end > start:
            raise RowError(f"bound task {task} record has end {end} <= start {start}")
        return start, end

    def _directories(self, task: str) -> list[Path]:
        _, vlm_prefix, _, _, lmms_prefix = TASKS[task]
        if self.layout == "vlmevalkit":
            return [self.root / "video" / vlm_prefix, self.root / "video" / "data0613" / vlm_prefix]
        return [self.root / lmms_prefix, self.root / "data0613" / lmms_prefix]

    def make_sample(self, rec: dict[str, Any]) -> Sample:
        task = rec["_task"]
        sid = self.record_id(rec, rec["_position"])
        candidates = list_field(rec.get("candidates"), "candidates")
        answer_text = text_field(rec, "answer")
        if answer_text not in candidates:
            raise RowError(f"answer {answer_text!r} is not one of the candidates {candidates}")
        letters = [chr(ord("A") + i) for i in range(len(candidates))]
        answer = letters[candidates.index(answer_text)]
        question = text_field(rec, "question")
        video_name = text_field(rec, "video")
        bound = self._bound(rec, task)
        meta: dict[str, Any] = {
            **self.video_meta(),
            "task": task,
            "task_name": TASKS[task][0],
            "question": question,
            "candidates": candidates,
            "options": dict(zip(letters, candidates)),
            "answer": answer,
            "answer_text": answer_text,
        }
        if bound is not None:
            meta["start"], meta["end"] = bound
        stored_as = TASKS[task][2] if self.layout == "vlmevalkit" else "video"
        if stored_as == "frame":
            directory = self._frame_dir(task, video_name)
            if self.num_frames is None:
                raise RowError(f"{task} is stored as frame folders: set num_frames to decode them")
            video: Any = read_frame_folder(directory, self.num_frames, bound, self.frame_sampling)
            meta["frame_dir"] = str(directory)
            meta["frame_fps"] = FRAME_FOLDER_FPS
        else:
            video = str(self.video_path(self._directories(task), video_name))
        preamble, text = mvbench_prompt(question, candidates)
        return Sample(id=sid, question=text, preamble=preamble, verbatim=True, video=video, answer=answer, meta=meta)

    def _frame_dir(self, task: str, name: str) -> Path:
        dirs = [self.video_dir_override] if self.video_dir_override is not None else self._directories(task)
        for d in dirs:
            if (d / name).is_dir():
                return d / name
        raise RowError(f"frame folder not found (tried {', '.join(str(d / name) for d in dirs)})")

    def extract(self, prediction: str, sample_meta: dict[str, Any]) -> str | None:
        options = sample_meta["options"]
        letter = first_token_letter(prediction, list(options))
        if letter is not None:
            return letter
        return extract_option_letter(str(prediction), options)

    def score(self, records: list[Record], judge: Any = None) -> dict[str, Any]:
        per_task: dict[str, list[int]] = {}
        answered = correct_answered = 0
        for rec in records:
            pred = "" if rec.prediction is None else str(rec.prediction)
            if self.answer_rule == "vlmevalkit_check_ans":
                rec.extracted = rec.answer if check_ans(pred, rec.answer) else extract_option_letter(pred, rec.meta["options"])
            else:
                rec.extracted = self.extract(pred, rec.meta) if pred.strip() else None
            ok = int(rec.extracted is not None and rec.extracted == rec.answer)
            per_task.setdefault(rec.meta["task"], []).append(ok)
            if pred.strip():
                answered += 1
                correct_answered += ok
        tasks = {t: percent(sum(v), len(v)) for t, v in per_task.items()}
        ordered = {t: tasks[t] for t in TASKS if t in tasks}
        total = sum(len(v) for v in per_task.values())
        return {
            **self.describe(),
            "n": len(records),
            "overall": percent(sum(sum(v) for v in per_task.values()), total),
            "task_mean": sum(ordered.values()) / len(ordered) if ordered else 0.0,
            "overall_answered": percent(correct_answered, answered),
            "answered": answered,
            "unextracted": sum(r.extracted is None for r in records),
            "tasks": ordered,
        }
