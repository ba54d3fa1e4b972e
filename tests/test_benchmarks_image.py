"""Image benchmarks on tiny fixtures written in the real VLMEvalKit TSV format, and every scorer on
hand-made predictions against hand-computed scores (the arithmetic is in the comments)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures import (
    BLUE,
    CORRUPT_B64,
    GREEN,
    RED,
    b64,
    mme_rows,
    mmvet_rows,
    png_bytes,
    pope_rows,
    seedbench_rows,
    write_tsv,
)
from omegaconf import OmegaConf
from PIL import Image

from explain_prune.benchmarks import BENCHMARKS, FakeJudge, Record, build_benchmark
from explain_prune.benchmarks.extract import (
    extract_option_letter,
    extract_yes_no,
    vqa_normalize_punctuation,
)
from explain_prune.benchmarks.judge import JudgeReply
from explain_prune.benchmarks.mmvet import grader_prompt, parse_grade, rule_grade
from explain_prune.benchmarks.vlmeval_tsv import mcq_prompt, resolve_root
from explain_prune.core import InputError, Sample, SampleError

CONF = Path(__file__).resolve().parents[1] / "conf"

# --- fixture helpers ----------------------------------------------------------------------------


def color_of(img: Image.Image) -> tuple[int, int, int]:
    return img.convert("RGB").getpixel((0, 0))


def split_items(items):
    samples = [x for x in items if isinstance(x, Sample)]
    errors = {x.id: x.reason for x in items if isinstance(x, SampleError)}
    return samples, errors


def rec(sample_id, prediction, answer, **meta) -> Record:
    return Record(id=str(sample_id), prediction=prediction, answer=answer, meta=meta)


# --- the TSV reader (through MME, whose TSV uses row-index image reuse) --------------------------


def test_mme_reader_reuse_errors_and_meta(tmp_path):
    write_tsv(tmp_path / "MME.tsv", mme_rows())
    bench = build_benchmark("mme", tmp_path)
    samples, errors = split_items(list(bench.load()))
    assert [s.id for s in samples] == ["1", "2", "3", "4"]
    # row 2 reuses row 1's image through its index, row 4 reuses row 3's
    assert color_of(samples[1].images[0]) == RED and samples[1].images[0].size == (4, 4)
    assert color_of(samples[3].images[0]) == GREEN and samples[3].images[0].size == (5, 3)
    # the MME prompt is the TSV question unchanged; the answer is normalised to Yes/No
    assert samples[0].question == "Is there a red square? Please answer yes or no."
    assert [s.answer for s in samples] == ["Yes", "No", "Yes", "No"]
    assert samples[1].meta["image_key"] == "existence/1.png" and samples[1].meta["category"] == "existence"
    assert set(errors) == {"5", "6", "7", "8", "9"}
    assert "corrupt base64" in errors["5"]
    assert "undecodable" in errors["6"]
    assert "no answer" in errors["7"]
    assert "'999'" in errors["8"] and "not in the TSV" in errors["8"]
    assert "not Yes/No" in errors["9"]
    # limit counts rows (readable or not)
    assert len(list(bench.load(limit=3))) == 3
    assert len(list(build_benchmark("mme", tmp_path, limit=2).load())) == 2


def test_mme_pairs_by_source_row_without_image_path(tmp_path):
    # without an image_path column the pairing key is the row that stores the image bytes
    rows = [{k: v for k, v in r.items() if k != "image_path"} for r in mme_rows()[:4]]
    write_tsv(tmp_path / "MME.tsv", rows)
    samples, _ = split_items(list(build_benchmark("mme", tmp_path).load()))
    assert [s.meta["image_key"] for s in samples] == ["index:1", "index:1", "index:3", "index:3"]


def test_missing_tsv_names_file_and_directory(tmp_path):
    with pytest.raises(InputError) as err:
        list(build_benchmark("mmstar", tmp_path / "nowhere").load())
    assert "MMStar.tsv" in str(err.value) and str(tmp_path / "nowhere") in str(err.value)


def test_root_falls_back_to_env_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMUData", str(tmp_path / "lmu"))
    assert resolve_root(None) == tmp_path / "lmu"
    assert resolve_root("/explicit") == Path("/explicit")
    monkeypatch.delenv("LMUData")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_root(None) == tmp_path / "home" / "LMUData"
    (tmp_path / "home" / "LMUData").mkdir(parents=True)
    write_tsv(tmp_path / "home" / "LMUData" / "POPE.tsv", [
        dict(index=0, image=b64(RED), question="Is there a cat in the image?", answer="No", category="random"),
    ])
    samples, _ = split_items(list(build_benchmark("pope", None).load()))
    assert len(samples) == 1


def test_multi_image_rows_are_parsed_safely(tmp_path):
    marker = tmp_path / "pwned"
    rows = [
        dict(index=0, image=str([b64(RED), b64(BLUE)]), question="Which is red?", A="left", B="right",
             answer="A", category="c"),
        # a list-looking string that is code, not a literal: must be rejected, never executed
        dict(index=1, image=f"[__import__('pathlib').Path({str(marker)!r}).touch()]" + " " * 64,
             question="q", A="x", B="y", answer="A", category="c"),
    ]
    write_tsv(tmp_path / "MMStar.tsv", rows)
    samples, errors = split_items(list(build_benchmark("mmstar", tmp_path).load()))
    assert [color_of(im) for im in samples[0].images] == [RED, BLUE]
    assert "list literal" in errors["1"]
    assert not marker.exists()


def test_meta_only_tsv_reads_image_files(tmp_path):
    # VLMEvalKit's localised TSV: no `image` column, `image_path` relative to images/<Dataset>/
    img_dir = tmp_path / "images" / "SEEDBench_IMG"
    img_dir.mkdir(parents=True)
    Image.new("RGB", (6, 6), GREEN).save(img_dir / "0.png")
    write_tsv(tmp_path / "SEEDBench_IMG_local.tsv", [
        dict(index=0, image_path="0.png", question="What color?", A="red", B="green", answer="B",
             category="Instance Attributes"),
        dict(index=1, image_path="missing.jpg", question="q", A="a", B="b", answer="A", category="x"),
    ])
    samples, errors = split_items(list(build_benchmark("seedbench", tmp_path).load()))
    assert color_of(samples[0].images[0]) == GREEN
    assert "missing.jpg" in errors["1"] and "does not exist" in errors["1"]


# --- MCQ prompts and readers ----------------------------------------------------------------------


def mmstar_rows() -> list[dict]:
    return [
        dict(index=0, image=b64(RED), question="What color is the square?", A="red", B="green", C="blue",
             D=np.nan, answer="A", category="coarse perception", **{"l2-category": "image color"}),
        dict(index=1, image="0", question="How many squares?", A="1", B="2", C="3", D="None",
             answer="D", category="math", hint="Count carefully.", **{"l2-category": "numeric"}),
        dict(index=2, image=b64(BLUE), question="Pick E", A="x", B="y", C="z", D="w", answer="E",
             category="math", **{"l2-category": "numeric"}),
        dict(index=3, image=b64(BLUE), question="No answer", A="x", B="y", C="z", D="w", answer=np.nan,
             category="math", **{"l2-category": "numeric"}),
        dict(index=4, image=CORRUPT_B64, question="Corrupt", A="x", B="y", C="z", D="w", answer="A",
             category="math", **{"l2-category": "numeric"}),
    ]


def test_mmstar_reader_prompt_and_options(tmp_path):
    write_tsv(tmp_path / "MMStar.tsv", mmstar_rows())
    samples, errors = split_items(list(build_benchmark("mmstar", tmp_path).load()))
    s0, s1 = samples
    # the NaN option D is dropped from the options and from the prompt
    assert s0.meta["options"] == {"A": "red", "B": "green", "C": "blue"}
    assert s0.question == (
        "Question: What color is the square?\nOptions:\nA. red\nB. green\nC. blue\n"
        "Please select the correct answer from the options above."
    )
    # a literal option text "None" is an option, not a missing cell; the hint comes first
    assert s1.meta["options"]["D"] == "None"
    assert s1.question.startswith("Hint: Count carefully.\nQuestion: How many squares?\nOptions:\nA. 1\n")
    assert color_of(s1.images[0]) == RED  # index reuse
    assert s1.meta["l2-category"] == "numeric" and s1.answer == "D"
    assert "'E' is not one of the options" in errors["2"]
    assert "no answer" in errors["3"]
    assert "corrupt base64" in errors["4"]


def test_mcq_prompt_chinese_instruction():
    assert mcq_prompt("图中是什么？", {"A": "猫", "B": "狗"}).endswith("B. 狗\n请直接回答选项字母。")


def test_seedbench_reader(tmp_path):
    write_tsv(tmp_path / "SEEDBench_IMG.tsv", seedbench_rows())
    samples, errors = split_items(list(build_benchmark("seedbench", tmp_path).load()))
    assert not errors and [s.meta["category"] for s in samples] == ["Scene Understanding", "Instance Identity"]
    assert samples[1].question.endswith("D. line\nPlease select the correct answer from the options above.")


def test_pope_reader(tmp_path):
    write_tsv(tmp_path / "POPE.tsv", pope_rows())
    samples, errors = split_items(list(build_benchmark("pope", tmp_path).load()))
    assert samples[0].question == "Is there a dog in the image? Please answer yes or no."
    assert samples[0].meta["splits"] == ["adversarial", "popular", "random"]
    assert samples[1].meta["splits"] == ["random"]
    assert "no category" in errors["2"]


def test_mmvet_reader(tmp_path):
    write_tsv(tmp_path / "MMVet.tsv", mmvet_rows())
    samples, errors = split_items(list(build_benchmark("mmvet", tmp_path).load()))
    assert samples[0].question == "What are the two numbers?" and samples[0].answer == "3<AND>5"
    assert samples[0].meta["category"] == "ocr,math"
    assert "no answer" in errors["v1"]


# --- rows with bad bytes, blank questions ---------------------------------------------------------


def write_with_bad_bytes(path: Path, rows: list[dict]) -> Path:
    """The TSV as VLMEvalKit writes it, then each "<BAD>" replaced by bytes that are not UTF-8."""
    write_tsv(path, rows)
    path.write_bytes(path.read_bytes().replace(b"<BAD>", b"\xff\xfe"))
    return path


def test_invalid_utf8_skips_only_its_row(tmp_path):
    """Bytes that are not UTF-8 make their own row a counted SampleError naming the row and column;
    every other row is read (real UTF-8 text included), and a reference to a skipped row's image
    still works when that image is intact."""
    q = " Please answer yes or no."
    rows = mme_rows()[:4]
    rows[0]["question"] = "Is there a red <BAD> square?" + q  # row 2 reuses this row's (intact) image
    rows[2]["image"] = rows[2]["image"][:20] + "<BAD>" + rows[2]["image"][20:]  # row 4 reuses this image
    rows.append(dict(index="5<BAD>", image=b64(BLUE), question="Is it blue?" + q, answer="Yes", category="color"))
    rows.append(dict(index=6, image=b64(RED), question="图中是红色的吗？" + q, answer="Yes", category="color"))
    write_with_bad_bytes(tmp_path / "MME.tsv", rows)
    items = list(build_benchmark("mme", tmp_path).load())
    assert len(items) == 6  # one item per row, in file order: limits and resume count rows
    samples, errors = split_items(items)
    assert [s.id for s in samples] == ["2", "6"]
    assert color_of(samples[0].images[0]) == RED
    assert samples[1].question == "图中是红色的吗？" + q
    assert set(errors) == {"1", "3", "4", "5\\xff\\xfe"}  # an id that is not UTF-8 is shown escaped
    assert errors["1"] == (
        "invalid UTF-8 in column 'question': byte(s) b'\\xff\\xfe' at character 15 (data row 1 of MME.tsv)"
    )
    assert errors["3"].startswith("invalid UTF-8 in column 'image':") and "data row 3 of MME.tsv" in errors["3"]
    assert "corrupt base64" in errors["4"]
    assert errors["5\\xff\\xfe"].startswith("invalid UTF-8 in column 'index':")


@pytest.mark.parametrize(
    "data",
    [
        b'"ind\xffex"\t"image"\t"question"\n"1"\t"x"\t"q"\n',  # header bytes that are not UTF-8
        "index\timage\tquestion\n1\tx\tq\n".encode("utf-16"),  # another encoding
        png_bytes(RED, (40, 40)),  # not text at all
    ],
    ids=["header", "utf16", "png"],
)
def test_file_that_is_not_utf8_text_is_one_input_error(tmp_path, data):
    (tmp_path / "MME.tsv").write_bytes(data)
    with pytest.raises(InputError) as err:
        list(build_benchmark("mme", tmp_path).load())
    message = str(err.value)
    assert str(tmp_path / "MME.tsv") in message and "not UTF-8" in message and "\n" not in message


def test_blank_question_is_a_counted_skip_before_the_template(tmp_path):
    """The MCQ and POPE templates wrap the question in fixed text, so the final prompt is never empty:
    the TSV's own question is what is checked."""
    blank = dict(image="10", A="a", B="b", answer="A", category="x")
    rows = [*seedbench_rows(), dict(index=13, question="  \t ", **blank), dict(index=14, question=np.nan, **blank)]
    write_tsv(tmp_path / "SEEDBench_IMG.tsv", rows)
    samples, errors = split_items(list(build_benchmark("seedbench", tmp_path).load()))
    assert [s.id for s in samples] == ["10", "11"]
    assert errors == {"13": "empty question (whitespace only)", "14": "no question"}
    write_tsv(tmp_path / "POPE.tsv", [dict(index=0, image=b64(RED), question=" \n ", answer="Yes", category="random")])
    assert split_items(list(build_benchmark("pope", tmp_path).load())) == ([], {"0": "empty question (whitespace only)"})


# --- extraction rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "Yes"),
        ("yes.", "Yes"),
        ("YES!", "Yes"),
        ("No, there is no dog.", "No"),
        ("(no)", "No"),
        ("Yes, but no.", "Unknown"),  # both words
        ("yes/no", "Unknown"),  # '/' not next to a space becomes a space: "yes no"
        ("Yes:", "Unknown"),  # ':' is not a VQA punctuation mark, "yes:" is not the word "yes"
        ("Yes.The answer", "Unknown"),  # the period is deleted (not followed by a digit): "yesthe"
        ("There is a dog.", "Unknown"),
        ("Nope", "Unknown"),
        ("not", "Unknown"),
        ("", "Unknown"),
    ],
)
def test_extract_yes_no(text, expected):
    assert extract_yes_no(text) == expected


def test_vqa_punctuation_rule():
    assert vqa_normalize_punctuation("a-b") == "a b"  # no space next to '-': replaced by a space
    assert vqa_normalize_punctuation("a - b") == "a  b"  # a space next to '-': deleted
    assert vqa_normalize_punctuation("1,000 dogs, 2 cats") == "1000 dogs 2 cats"  # digit,digit: all deleted
    assert vqa_normalize_punctuation("3.5 end.") == "3.5 end"  # a period before a digit stays


OPTS = {"A": "red", "B": "green", "C": "blue", "D": "dark blue"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("(C)", "C"),
        ("The answer is C.", "C"),
        ("**D**", "D"),
        ("B. green", "B"),
        ("A or B", None),  # two letters, and neither option text matches
        ("b", None),  # letters are case-sensitive; "b" is no option text either
        ("green", "B"),  # option-text fallback
        ("It is blue", "C"),  # "blue" is in the answer, "dark blue" is not
        ("dark blue", None),  # both "blue" and "dark blue" occur: ambiguous
        ("A red square", "A"),  # upstream default: a standalone 'A' counts as the letter
        ("Z", "Z"),
        ("Cannot determine the answer from the image", "Z"),  # refusal
        ("", None),
    ],
)
def test_extract_option_letter(text, expected):
    assert extract_option_letter(text, OPTS) == expected


def test_extract_option_letter_letters_only():
    assert extract_option_letter("I pick (B).", ["A", "B", "C"]) == "B"
    assert extract_option_letter("green", ["A", "B", "C"]) is None


# --- scorers against hand-computed numbers -------------------------------------------------------


def test_mme_score_acc_plus_pairs_by_image_path():
    bench = BENCHMARKS["mme"]()
    m = lambda cat, img: dict(category=cat, image_key=img)  # noqa: E731
    records = [  # deliberately interleaved: pairing must follow image_key, not row order
        rec(1, "Yes", "Yes", **m("existence", "e1")),
        rec(3, "yes.", "Yes", **m("existence", "e2")),
        rec(5, "No", "Yes", **m("count", "c1")),
        rec(2, "No", "No", **m("existence", "e1")),
        rec(4, "Yes", "No", **m("existence", "e2")),
        rec(6, "no", "No", **m("count", "c1")),
        rec(7, "I think yes", "Yes", **m("code_reasoning", "r1")),
        rec(8, "Not sure", "No", **m("code_reasoning", "r1")),
    ]
    out = bench.score(records)
    # existence: 4 questions, 3 right -> acc 75; images e1 (both right), e2 (one wrong) -> acc+ 50
    assert out["categories"]["existence"] == pytest.approx(
        {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "questions": 4, "images": 2})
    # count: c1 = (wrong, right) -> acc 50, acc+ 0 -> 50
    assert out["categories"]["count"]["score"] == pytest.approx(50.0)
    # code_reasoning: r1 = (right, "Not sure" -> Unknown -> wrong) -> acc 50, acc+ 0 -> 50
    assert out["categories"]["code_reasoning"]["score"] == pytest.approx(50.0)
    assert out["perception"] == pytest.approx(125.0 + 50.0)  # existence + count
    assert out["cognition"] == pytest.approx(50.0)
    assert out["total"] == out["overall"] == pytest.approx(225.0)
    assert out["unknown_answers"] == 1 and out["incomplete_pairs"] == 0
    assert "OCR" in out["missing_subtasks"] and "existence" not in out["missing_subtasks"]
    assert out["prompt_id"] == "vlmeval_raw_question" and out["extraction_id"] == "vlmeval_yorn"
    assert [r.extracted for r in records[:2]] == ["Yes", "Yes"]


def test_mme_score_full_marks_and_subtask_sums():
    # every subtask with one perfectly answered image: each scores 100 + 100 = 200,
    # perception = 10 * 200 = 2000, cognition = 4 * 200 = 800, total = 2800
    from explain_prune.benchmarks.mme import COGNITION, PERCEPTION

    records = []
    for cat in PERCEPTION + COGNITION:
        records += [rec(f"{cat}1", "Yes", "Yes", category=cat, image_key=cat),
                    rec(f"{cat}2", "No", "No", category=cat, image_key=cat)]
    out = BENCHMARKS["mme"]().score(records)
    assert (out["perception"], out["cognition"], out["total"]) == (2000.0, 800.0, 2800.0)
    assert out["missing_subtasks"] == []


def test_pope_score_hand_computed():
    bench = BENCHMARKS["pope"]()
    records = [
        rec(1, "Yes", "Yes", category="adversarial,popular"),
        rec(2, "yes", "No", category="adversarial"),
        rec(3, "No.", "Yes", category="popular"),
        rec(4, "no", "No", category="random"),
        rec(5, "maybe", "Yes", category="random"),  # Unknown -> a "No" prediction
    ]
    out = bench.score(records)
    # exploded rows (truth, pred): adv (Y,Y) (N,Y); pop (Y,Y) (Y,N); rand (N,N) (Y,N)
    # overall: TP 2, FP 1, FN 2, TN 1 -> P = 2/3, R = 2/4, F1 = 2PR/(P+R) = (2/3)/(7/6) = 4/7
    assert out["n"] == 5 and out["n_exploded"] == 6
    assert out["precision"] == pytest.approx(100 * 2 / 3)
    assert out["recall"] == pytest.approx(50.0)
    assert out["f1"] == out["overall"] == pytest.approx(100 * 4 / 7)
    assert out["accuracy"] == pytest.approx(50.0)  # 3 of 6 rows right
    assert out["yes_ratio"] == pytest.approx(50.0)  # 3 of 6 rows predicted Yes
    # adversarial: TP 1, FP 1 -> P 1/2, R 1, F1 = 1/(3/2) = 2/3; acc 1/2; yes-ratio 2/2
    assert out["splits"]["adversarial"]["f1"] == pytest.approx(100 * 2 / 3)
    assert out["splits"]["adversarial"]["yes_ratio"] == pytest.approx(100.0)
    # popular: TP 1, FN 1 -> P 1, R 1/2, F1 2/3; acc 1/2; yes-ratio 1/2
    assert out["splits"]["popular"]["precision"] == pytest.approx(100.0)
    assert out["splits"]["popular"]["recall"] == pytest.approx(50.0)
    assert out["splits"]["popular"]["f1"] == pytest.approx(100 * 2 / 3)
    # random: no predicted positive -> P = R = F1 = 0; acc 1/2 (the TN); yes-ratio 0
    assert out["splits"]["random"] == pytest.approx(
        {"accuracy": 50.0, "accuracy_unknown_as_no": 50.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0, "n": 2})
    assert out["unknown_answers"] == 1


def test_pope_accuracy_counts_unknown_wrong_as_the_reference():
    """VLMEvalKit (e8e78f05) vlmeval/dataset/image_yorn.py scores a row `answer == extracted`, and
    utils/yorn.py POPE_rating's acc is that score's mean, while its F1 reads y_pred = extracted == "Yes".
    Where the two readings differ — "Unknown" for a truth-No question — the reference counts it wrong."""
    bench = BENCHMARKS["pope"]()
    records = [
        rec(1, "I don't know", "No", category="random"),   # Unknown, truth No: wrong for the reference
        rec(2, "no", "No", category="random"),             # right
        rec(3, "yes", "Yes", category="random"),           # right
        rec(4, "it may or may not", "Yes", category="random"),  # Unknown, truth Yes: wrong either way
    ]
    out = bench.score(records)
    assert out["accuracy"] == pytest.approx(50.0)  # 2 of 4: the reference rule
    assert out["accuracy_unknown_as_no"] == pytest.approx(75.0)  # the old rule credits row 1
    # precision / recall / F1 are the same under both readings: TP 1, FP 0, FN 1
    assert (out["precision"], out["recall"]) == (pytest.approx(100.0), pytest.approx(50.0))
    assert out["f1"] == pytest.approx(100 * 2 / 3)


def test_mcq_score_hand_computed():
    bench = BENCHMARKS["mmstar"]()
    opts = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
    m = lambda cat, l2: {"options": opts, "category": cat, "l2-category": l2}  # noqa: E731
    records = [
        rec(1, "A", "A", **m("coarse perception", "image scene")),  # right
        rec(2, "(C) bird", "B", **m("coarse perception", "image style")),  # wrong (C)
        rec(3, "The answer is C.", "C", **m("math", "numeric")),  # right
        rec(4, "a fish", "D", **m("math", "numeric")),  # right via option text
        rec(5, "B or C", "A", **m("math", "geometry")),  # nothing inferable -> wrong
    ]
    out = bench.score(records)
    assert out["overall"] == pytest.approx(60.0)  # 3 / 5
    assert out["categories"] == pytest.approx({"coarse perception": 50.0, "math": 100 * 2 / 3})
    assert out["l2_categories"] == pytest.approx(
        {"geometry": 0.0, "image scene": 100.0, "image style": 0.0, "numeric": 100.0})
    assert out["unextracted"] == 1 and "splits" not in out
    assert [r.extracted for r in records] == ["A", "C", "C", "D", None]


def test_seedbench_score_hand_computed():
    bench = BENCHMARKS["seedbench"]()
    opts = {"A": "one", "B": "two", "C": "three", "D": "four"}
    records = [
        rec(1, "B", "B", options=opts, category="Instance Counting"),
        rec(2, "D", "B", options=opts, category="Instance Counting"),
        rec(3, "two", "B", options=opts, category="Scene Understanding"),
        rec(4, "C", "C", options=opts, category="Scene Understanding"),
    ]
    out = bench.score(records)
    # 3 of 4 right; counting 1/2, scene 2/2
    assert out["overall"] == pytest.approx(75.0)
    assert out["categories"] == pytest.approx({"Instance Counting": 50.0, "Scene Understanding": 100.0})


# --- MM-Vet -----------------------------------------------------------------------------------------


def test_mmvet_prompt_semantics():
    p = grader_prompt("What are the numbers?", "3<AND>5", "3 and 5")
    assert "<AND> in the ground truth means it is totally right" in p
    assert "and <OR> means it is totally right when any one element" in p
    assert "What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0" in p  # few-shot table
    assert p.endswith("\nWhat are the numbers? | 3 <AND> 5 | 3 and 5 | ")
    assert grader_prompt("q", "a<OR>b", "p").endswith("\nq | a <OR> b | p | ")


@pytest.mark.parametrize(
    "reply, expected",
    [("0.5", 0.5), (" 1.0\n", 1.0), ("0", 0.0), ("1.1", None), ("-0.1", None), ("nan", None),
     ("inf", None), ("Score: 0.4", None), ("0.4 because", None), (None, None)],
)
def test_mmvet_parse_grade(reply, expected):
    assert parse_grade(reply) == expected


def test_mmvet_rule_grade_for_fake_judge():
    assert rule_grade("3<AND>5", "x = 3") == 0.5
    assert rule_grade("3 <AND> 5 <AND> 7", "3, 5 and 7") == 1.0
    assert rule_grade("seven<OR>7", "It is 7") == 1.0
    assert rule_grade("Paris", "the city of paris") == 1.0
    assert rule_grade("Paris", "London") == 0.0


def test_mmvet_score_with_fake_judge_hand_computed():
    bench = BENCHMARKS["mmvet"]()
    records = [
        rec(1, "a cat", "cat", question="What animal?", category="rec"),  # 1.0
        rec(2, "x = 3", "3<AND>5", question="What are x?", category="rec,ocr"),  # 1 of 2 -> 0.5
        rec(3, "eight", "7<OR>seven", question="How many?", category="ocr,math"),  # 0.0
    ]
    judge = FakeJudge()
    out = bench.score(records, judge=judge)
    # overall (1.0 + 0.5 + 0.0) / 3 = 0.5 -> 50
    assert out["overall"] == pytest.approx(50.0)
    # VLMEvalKit e8e78f05 vlmeval/dataset/utils/mmvet.py MMVet_acc: tot[capa] and tot[cate2] are one
    # dict, so the single-capability item 1 ("rec") is counted twice: rec = (1 + 1 + 0.5) / 3
    assert out["capabilities"] == pytest.approx({"rec": 250 / 3, "ocr": 25.0, "math": 0.0})
    assert out["combinations"] == pytest.approx({"ocr_math": 0.0, "rec": 250 / 3, "rec_ocr": 50.0})
    # each item once: rec (1.0 + 0.5)/2 = 75; ocr (0.5 + 0)/2 = 25; math 0; combination rec = item 1 alone
    assert out["capabilities_corrected"] == pytest.approx({"rec": 75.0, "ocr": 25.0, "math": 0.0})
    assert out["combinations_corrected"] == pytest.approx({"ocr_math": 0.0, "rec": 100.0, "rec_ocr": 50.0})
    assert out["judge"]["type"] == "fake" and out["judge"]["model"] == "fake-judge"
    assert out["judge_failed"] == 0
    assert [r.meta["judge_score"] for r in records] == [1.0, 0.5, 0.0]
    # one parsable reply per item, at temperature 0, asking for at most 3 tokens
    assert [(c["temperature"], c["max_tokens"]) for c in judge.calls] == [(0.0, 3)] * 3


class ScriptedJudge(FakeJudge):
    """Replies from a script, ignoring the fake rule; records temperatures."""

    def __init__(self, replies):
        super().__init__(model="scripted")
        self.replies = list(replies)

    def complete(self, prompt, *, temperature=None, max_tokens=None, fake_reply=None):
        self.calls.append({"prompt": prompt, "temperature": temperature, "max_tokens": max_tokens})
        text = self.replies.pop(0)
        if text is None:
            return JudgeReply(text=None, ok=False, error="connection refused", attempts=2)
        return JudgeReply(text=text, ok=True, attempts=1)


def test_mmvet_retries_with_rising_temperature_then_zero():
    bench = BENCHMARKS["mmvet"]()
    # item 1: three bad replies, then 0.3 on the 4th try; item 2: five bad replies -> 0.0
    judge = ScriptedJudge(["I think 0.5", "1.7", "nan", "0.3"] + ["bad"] * 5)
    records = [rec(1, "p", "a", question="q1", category="rec"), rec(2, "p", "a", question="q2", category="gen")]
    out = bench.score(records, judge=judge)
    temps = [c["temperature"] for c in judge.calls]
    assert temps == [0.0, 0.5, 1.0, 1.5] + [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [r.meta["judge_score"] for r in records] == [0.3, 0.0]
    assert out["overall"] == pytest.approx(15.0)  # (0.3 + 0.0) / 2 * 100
    assert out["judge_unparsable"] == 1 and out["judge_failed"] == 0
    assert "all 5 tries failed" in records[1].meta["judge_log"][-1]


def test_mmvet_unreachable_judge_is_recorded_or_fatal():
    bench = BENCHMARKS["mmvet"]()
    records = [rec(1, "p", "a", question="q1", category="rec"), rec(2, "cat", "cat", question="q2", category="rec")]
    out = bench.score(records, judge=ScriptedJudge([None, "1.0"]))
    # item 1 unreachable -> 0.0 and counted (no temperature retries on a transport failure)
    assert out["judge_failed"] == 1 and out["overall"] == pytest.approx(50.0)
    assert "connection refused" in records[0].meta["judge_log"][-1]
    with pytest.raises(InputError, match="could not be reached"):
        bench.score(records, judge=ScriptedJudge([None, None]))
    with pytest.raises(InputError, match="LLM judge"):
        bench.score(records, judge=None)


# --- registry and configs ---------------------------------------------------------------------------


def test_registry_and_configs(tmp_path):
    with pytest.raises(InputError) as err:
        build_benchmark("mmbench", tmp_path)
    assert "mme" in str(err.value) and "mmvet" in str(err.value)
    with pytest.raises(InputError, match=r"benchmark.max_new_token: unknown key \(allowed: limit, llm_matcher, max_new_tokens, root, tsv\)"):
        build_benchmark("mme", tmp_path, max_new_token=3)
    for name in ("mme", "pope", "mmstar", "seedbench", "mmvet"):
        cfg = OmegaConf.to_container(OmegaConf.load(CONF / "benchmark" / f"{name}.yaml"), resolve=True)
        assert cfg["name"] == name and cfg["limit"] is None and cfg["root"]
        bench = build_benchmark(cfg.pop("name"), cfg.pop("root"), **cfg)
        assert bench.name == name and bench.prompt_id and bench.extraction_id
        assert bench.max_new_tokens == cfg["max_new_tokens"]
