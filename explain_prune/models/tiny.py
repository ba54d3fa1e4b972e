"""Local word-level tokenizers for the tiny random-weight models and the synthetic model.

No hub access is possible here, so tiny models get a small tokenizer built in code, with the
special tokens of every family the project supports (Qwen2 chat markers, LLaVA's <image>, Llama-3
headers) so one builder serves all of them.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

BASE_WORDS = (
    "system user assistant you are a an the helpful language and vision assistant . , ? ! : ; ' \" ( ) - "
    "what which who where when why how is are was were do does did can could should would will of in on at to "
    "for with from by this that these those it its there here image video picture photo frame frames scene "
    "answer question option options letter choose select given following best describe brief briefly word "
    "single phrase yes no not true false A B C D E F a b c d e f 0 1 2 3 4 5 6 7 8 9 10 "
    "red green blue yellow purple orange cyan white black gray brown pink "
    "circle square triangle cross diamond star shape color colour object objects left right top bottom middle "
    "center up down many count number how-many person man woman dog cat car tree sky water "
    "please carefully look first then finally only"
).split()


def build_tokenizer(extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A deterministic word-level tokenizer: ids 0..len(SPECIAL_TOKENS)-1 are the special tokens,
    then "[UNK]", then the words (BASE_WORDS + extra_words) and their capitalised forms."""
    vocab: dict[str, int] = {}
    words = [*BASE_WORDS, *extra_words]
    for token in [*SPECIAL_TOKENS, "[UNK]", *words, *(w.capitalize() for w in words)]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
    )
    return tokenizer
