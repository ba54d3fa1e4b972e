"""Local word-level tokenizers for the tiny random-weight models and the synthetic model, and the
sizes every family's tiny random-weight model reads from its `tiny:` config block.

No hub access is possible here, so tiny models get a small tokenizer built in code, with the
special tokens of every family the project supports (Qwen2 chat markers, LLaVA's <image>, Llama-3
headers) so one builder serves all of them.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

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


def tiny_lm_kwargs(tiny: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    """The language model's config arguments from a `tiny:` block, named as every family's
    conf/model/tiny_*.yaml names them; the vocabulary is the tokenizer's."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=int(tiny["hidden_size"]),
        intermediate_size=int(tiny["intermediate_size"]),
        num_hidden_layers=int(tiny["num_layers"]),
        num_attention_heads=int(tiny["num_heads"]),
        num_key_value_heads=int(tiny["num_kv_heads"]),
        initializer_range=float(tiny.get("initializer_range", 0.02)),
    )


def tiny_siglip_kwargs(vision: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """SiglipVisionConfig arguments from a tiny config's `vision` block (`image_size` is the family's
    default); no pooling head, since both SigLIP families read the patch tokens only."""
    return dict(
        hidden_size=int(vision.get("hidden_size", 32)),
        intermediate_size=int(vision.get("intermediate_size", 64)),
        num_hidden_layers=int(vision.get("num_layers", 2)),
        num_attention_heads=int(vision.get("num_heads", 4)),
        image_size=int(vision.get("image_size", image_size)),
        patch_size=int(vision.get("patch_size", 14)),
        vision_use_head=False,
    )
