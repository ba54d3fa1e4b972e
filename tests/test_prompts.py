"""Prompts as a function of (benchmark, model family), as VLMEvalKit e8e78f05 builds them.

Facts from the reference (not its code): vlmeval/vlm/base.py L17-27 — a model without a custom prompt
uses the dataset's `build_prompt`; vlmeval/vlm/qwen2_vl/prompt.py `use_custom_prompt` — Qwen2-VL has
its own MCQ and POPE (Y/N) prompts; vlmeval/vlm/llava/llava.py `LLaVA_OneVision` and vlmeval/vlm/vila.py
`VILA.use_custom_prompt` (False) — both take the dataset defaults.  How each model lays out a message:
Qwen2-VL `_prepare_content` keeps the items in order (roles ignored), VILA `generate_inner` concatenates
them in order, LLaVA-OneVision `generate_inner_video` puts the visual first and all text after it.
"""

from __future__ import annotations

import functools

import pytest
from fixtures import RED, b64, write_tsv
from helpers import TINY_MODELS, model_cfg, random_image

from explain_prune.benchmarks import build_benchmark
from explain_prune.core import Sample
from explain_prune.models import build_vlm

FAMILY = {"tiny_qwen2vl": "qwen2vl", "tiny_llava_ov": "llava_onevision", "tiny_vila": "vila"}


@functools.lru_cache(maxsize=None)
def tiny(name):
    return build_vlm(model_cfg(name))


def tsv_rows(question: str, **extra) -> list[dict]:
    return [dict(index=1, image=b64(RED), question=question, answer=extra.pop("answer", "Yes"),
                 category=extra.pop("category", "random"), **extra)]


@pytest.mark.parametrize("family,suffix,prompt_id", [
    ("qwen2vl", " Please answer yes or no.", "vlmeval_qwen2vl_yorn"),
    ("llava_onevision", "", "vlmeval_raw_question"),
    ("vila", "", "vlmeval_raw_question"),
])
def test_pope_prompt_per_family(tmp_path, family, suffix, prompt_id):
    write_tsv(tmp_path / "POPE.tsv", tsv_rows("Is there a cat in the image?"))
    bench = build_benchmark("pope", tmp_path, family=family)
    (sample,) = list(bench.load())
    assert sample.question == "Is there a cat in the image?" + suffix
    assert bench.prompt_id == prompt_id and bench.describe()["prompt_id"] == prompt_id


@pytest.mark.parametrize("family", ["qwen2vl", "llava_onevision", "vila"])
def test_mcq_prompt_per_family(tmp_path, family):
    write_tsv(tmp_path / "MMStar.tsv", tsv_rows("Which color?", A="red", B="blue", answer="A", category="cp"))
    bench = build_benchmark("mmstar", tmp_path, family=family)
    (sample,) = list(bench.load())
    body = "Question: Which color?\nOptions:\nA. red\nB. blue\nPlease select the correct answer from the options above."
    if family == "qwen2vl":  # Qwen2VLPromptMixin._build_mcq_prompt strips the prompt
        assert (sample.question, bench.prompt_id) == (body, "vlmeval_qwen2vl_mcq")
    else:  # ImageMCQDataset.build_prompt (image_mcq.py L238): the instruction ends in " \n", nothing stripped
        assert (sample.question, bench.prompt_id) == (body + " \n", "vlmeval_default_mcq")
    assert sample.verbatim


def layout(vlm, sample):
    """(tokens before the visual span, instruction tokens, all ids) of the prompt the family builds."""
    host = vlm.preprocess(sample)
    return int(host.visual_index[0]), host.instruction_index.numel(), host.input_ids[0].tolist()


@pytest.mark.parametrize("name", TINY_MODELS)
def test_preamble_and_verbatim_text_are_placed_as_each_family_reads_its_message(name):
    vlm = tiny(name)
    image = [random_image(3)]
    plain = layout(vlm, Sample(id="p", question="Which one is red?", images=image))
    framed = layout(vlm, Sample(id="p", preamble="Watch closely please.", question="Which one is red?", images=image))
    assert len(framed[2]) > len(plain[2])  # the preamble is in the prompt
    if name == "tiny_llava_ov":  # all text after the visual input; the A_v^0 rows cover the preamble too
        assert framed[0] == plain[0] and framed[1] > plain[1]
    else:  # the message order: preamble, visual, question; A_v^0 rows are the question after the visual
        assert framed[0] > plain[0] and framed[1] == plain[1]
    # verbatim keeps surrounding whitespace; free text from data sources is stripped (the tiny tokenizers
    # split on whitespace, so the text handed to the tokenizer is what is compared)
    padded = "\nWhich one is red? Answer: "
    assert padded in tokenized_text(vlm, Sample(id="v", question=padded, verbatim=True, images=image))
    free = tokenized_text(vlm, Sample(id="s", question=padded, images=image))
    assert padded not in free and padded.strip() in free


class SpyTokenizer:
    """Delegates to a tokenizer and records the text of every call."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, text, *args, **kwargs):
        self.texts.append(text)
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def tokenized_text(vlm, sample) -> str:
    spy = SpyTokenizer(vlm.tokenizer)
    vlm.tokenizer = spy
    try:
        vlm.preprocess(sample)
    finally:
        vlm.tokenizer = spy.tokenizer
    return "".join(t if isinstance(t, str) else "".join(t) for t in spy.texts)
