"""LLaVA-OneVision adapter on the tiny random-weight model (conf/model/tiny_llava_ov.yaml).

The ground truth is transformers itself: the HF processor (built with the image-only workaround,
since its video processor needs torchvision) for the prompt ids, and the HF model's own
pixel_values path for the logits and the greedy tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from transformers import LlavaOnevisionProcessor
from transformers.processing_utils import ProcessorMixin

from explain_prune.core import InputError
from explain_prune.models import Sample, build_vlm
from explain_prune.models.llava_onevision import LLAVA_OV_CHAT_TEMPLATE

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "model" / "tiny_llava_ov.yaml"
QUESTION = "What color is the circle ?"
FRAME_COLORS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20), (20, 230, 230), (230, 20, 230)]


class ImageOnlyProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without the torchvision video processor (torchvision is not installed: README Quickstart)."""

    def __init__(self, image_processor, tokenizer, num_image_tokens, vision_aspect_ratio, chat_template):
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = "full"
        self.image_token, self.video_token = "<image>", "<video>"
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        self.video_token_id = tokenizer.convert_tokens_to_ids("<video>")
        self.vision_aspect_ratio = vision_aspect_ratio
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def hf_processor(vlm) -> ImageOnlyProcessor:
    return ImageOnlyProcessor(
        vlm.image_processor, vlm.tokenizer, vlm.patches**2, vlm.vision_aspect_ratio, LLAVA_OV_CHAT_TEMPLATE
    )


def hf_image_inputs(vlm, images: list[Image.Image], question: str = QUESTION) -> dict:
    proc = hf_processor(vlm)
    msgs = [{"role": "user", "content": [*[{"type": "image"}] * len(images), {"type": "text", "text": question}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    out = proc(text=[text], images=[images], return_tensors="pt")
    return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images")}


def random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def prompt_logits(vlm, prompt) -> torch.Tensor:
    with torch.no_grad():
        return vlm.model(
            inputs_embeds=prompt.inputs_embeds, position_ids=prompt.position_ids, attention_mask=prompt.attention_mask
        ).logits


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads; on the shared 2-core box two OpenMP threads
    competing with other jobs made each forward ~100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def vlm():
    return build_vlm(OmegaConf.load(CONFIG))


@pytest.fixture(scope="module")
def video_path(tmp_path_factory) -> Path:
    """A 6-frame 64x48 mp4, one solid colour per frame."""
    import av

    path = tmp_path_factory.mktemp("video") / "colors.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=6)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "0"}
        for color in FRAME_COLORS:
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), color, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# --- (a) the VisualPrompt path equals the HF path ---------------------------------------------------
@pytest.mark.parametrize(
    "sizes, aspect, grid",
    [
        ([(80, 130)], None, (1, 4, 8)),  # non-square: 2x2 crops, unpadded to 4 rows x 8 cols
        ([(60, 200)], None, (1, 2, 8)),  # wide: 1x2 crops, unpadded to 2 rows
        ([(112, 100)], "anyres_max_1", (1, 4, 4)),  # 8x8 map > 1 tile -> bilinear downscale branch
        ([(80, 130), (50, 40)], None, (2, 4, 4)),  # several images: multi-image mode (base + newline each)
    ],
)
def test_image_prompt_matches_hf_processor_and_model(vlm, sizes, aspect, grid):
    if aspect:
        cfg = OmegaConf.load(CONFIG)
        cfg.image.vision_aspect_ratio = aspect
        vlm = build_vlm(cfg)
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    prompt = vlm.prepare(Sample(id="img", question=QUESTION, images=images))
    hf = hf_image_inputs(vlm, images)

    assert prompt.visual_grid == grid
    assert prompt.num_visual == sum(vlm.segment_tokens(s) for s in prompt.meta["visual_segments"])
    assert torch.equal(prompt.input_ids, hf["input_ids"])  # same text, same placeholder expansion
    assert prompt.position_ids.tolist() == [list(range(prompt.length))]
    assert prompt.attention_mask.sum() == prompt.length
    with torch.no_grad():
        reference = vlm.model(**hf).logits
    assert (prompt_logits(vlm, prompt) - reference).abs().max() <= 1e-5


def test_video_prompt_matches_hf_model(vlm, video_path):
    prompt = vlm.prepare(Sample(id="vid", question="What is this ?", video=str(video_path)))
    pixels = prompt.meta["pixel_values_videos"]
    assert pixels.shape == (1, vlm.num_frames, 3, 56, 56)
    # linspace over 6 frames picks 0, 2, 3, 5; SigLIP normalisation maps c to (c/255 - 0.5)/0.5
    expected = torch.tensor([FRAME_COLORS[i] for i in (0, 2, 3, 5)], dtype=torch.float32) / 127.5 - 1
    assert (pixels[0].mean(dim=(2, 3)) - expected).abs().max() < 0.05

    # placeholder text: the processor's chat template with <video> expanded by its own count
    proc = hf_processor(vlm)
    count = proc._get_num_multimodal_tokens(video_sizes=[(vlm.num_frames, 56, 56)])["num_video_tokens"][0]
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is this ?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True).replace("<video>", "<video>" * count)
    assert prompt.input_ids[0].tolist() == vlm.tokenizer(text, add_special_tokens=False)["input_ids"]

    with torch.no_grad():
        reference = vlm.model(
            input_ids=prompt.input_ids, pixel_values_videos=pixels, attention_mask=prompt.attention_mask
        ).logits
    assert (prompt_logits(vlm, prompt) - reference).abs().max() <= 1e-5


# --- (b) token bookkeeping ----------------------------------------------------------------------------
def test_visual_tokens_match_placeholders_features_and_layout(vlm):
    image = random_image(80, 130)
    prompt = vlm.prepare(Sample(id="img", question=QUESTION, images=[image]))
    placeholders = (prompt.input_ids[0] == vlm.image_token_id).nonzero().squeeze(-1)
    assert torch.equal(prompt.visual_index, placeholders)
    hf = hf_image_inputs(vlm, [image])
    with torch.no_grad():
        feats = vlm.model.model.get_image_features(hf["pixel_values"], hf["image_sizes"]).pooler_output
    processor_count = hf_processor(vlm)._get_num_multimodal_tokens(image_sizes=[(80, 130)])["num_image_tokens"][0]
    assert prompt.num_visual == feats[0].shape[0] == processor_count == 52
    assert torch.equal(prompt.visual_index, torch.arange(prompt.visual_index[0], prompt.visual_index[0] + 52))

    # layout: 4x4 base thumbnail, then a 4x8 unpadded crop map with one newline per row
    base, crops = prompt.meta["visual_segments"]
    assert (base["kind"], base["rows"], base["cols"], base["start"]) == ("base", 4, 4, 0)
    assert (crops["kind"], crops["rows"], crops["cols"], crops["start"]) == ("crops", 4, 8, 16)
    assert prompt.visual_grid == (1, 4, 8)
    newline = vlm.model.model.image_newline
    visual = prompt.inputs_embeds[0, prompt.visual_index]
    is_newline = (visual == newline).all(-1).nonzero().squeeze(-1).tolist()
    assert is_newline == [16 + r * 9 + 8 for r in range(4)]

    # the instruction positions are exactly the question's tokens
    words = vlm.tokenizer.convert_ids_to_tokens(prompt.input_ids[0, prompt.instruction_index])
    assert " ".join(words) == QUESTION
    assert prompt.instruction_index[0] == prompt.visual_index[-1] + 1  # the word-level tokenizer drops "\n"


def test_instruction_index_excludes_template_tokens_around_the_question():
    """Real Qwen2 BPE keeps the "\n" after <image> as a token; emulate template text on both sides."""
    vlm = build_vlm(OmegaConf.load(CONFIG))
    template = LLAVA_OV_CHAT_TEMPLATE.replace("{{ '<image>\\n' }}", "{{ '<image>\\nQuestion : ' }}")
    template = template.replace(
        "{{ content['text'] }}{% endfor %}{% else %}", "{{ content['text'] + ' please answer' }}{% endfor %}{% else %}"
    )
    assert template.count("Question : ") == 1 and template.count("please answer") == 1
    vlm.chat_template = template
    prompt = vlm.prepare(Sample(id="img", question=QUESTION, images=[random_image(40, 40)]))
    words = vlm.tokenizer.convert_ids_to_tokens(prompt.input_ids[0, prompt.instruction_index])
    assert " ".join(words) == QUESTION
    assert int(prompt.instruction_index[0]) == int(prompt.visual_index[-1]) + 3  # after "Question :"
    assert prompt.length - int(prompt.instruction_index[-1]) - 1 == 5  # please answer <|im_end|> <|im_start|> assistant


def test_video_token_count_and_grid(vlm):
    frames = [random_image(48, 64, seed=i) for i in range(3)]
    prompt = vlm.prepare(Sample(id="frames", question="What is this ?", video=frames))
    pooled = math.ceil(vlm.patches / 2)
    with torch.no_grad():
        feats = vlm.model.model.get_video_features(prompt.meta["pixel_values_videos"]).pooler_output
    assert prompt.num_visual == feats.shape[1] == 3 * pooled * pooled + 1 == 13
    assert int((prompt.input_ids == vlm.video_token_id).sum()) == 13
    assert prompt.visual_grid == (3, pooled, pooled)
    # the last visual token is the video's newline embedding
    assert torch.equal(prompt.inputs_embeds[0, prompt.visual_index[-1]], vlm.model.model.image_newline)
    words = vlm.tokenizer.convert_ids_to_tokens(prompt.input_ids[0, prompt.instruction_index])
    assert " ".join(words) == "What is this ?"


def test_modality_overrides_frame_budget(video_path):
    vlm = build_vlm(OmegaConf.load(CONFIG), modality={"num_frames": 2, "sampling": "linspace"})
    prompt = vlm.prepare(Sample(id="vid", question="What is this ?", video=video_path))
    assert prompt.meta["pixel_values_videos"].shape[1] == 2
    assert prompt.num_visual == 2 * 2 * 2 + 1


# --- (c) generation and the decoder parts -------------------------------------------------------------
def test_generate_reference_matches_hf_generate(vlm):
    image = random_image(80, 130)
    prompt = vlm.prepare(Sample(id="img", question=QUESTION, images=[image]))
    tokens = vlm.generate_reference(prompt, 5)
    assert 1 <= tokens.numel() <= 5
    if tokens.numel() < 5:
        assert int(tokens[-1]) in vlm.eos_token_ids
    hf = hf_image_inputs(vlm, [image])
    with torch.no_grad():
        reference = vlm.model.generate(**hf, max_new_tokens=5, do_sample=False)[0, hf["input_ids"].shape[1] :]
    assert tokens.tolist() == reference.tolist()
    assert vlm.eos_token_ids == [vlm.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_decoder_parts_reproduce_the_model(vlm):
    prompt = vlm.prepare(Sample(id="img", question=QUESTION, images=[random_image(80, 130)]))
    parts = vlm.decoder
    cfg = OmegaConf.load(CONFIG)
    assert (parts.num_layers, parts.num_heads, parts.num_kv_heads, parts.head_dim, parts.hidden_size) == (
        cfg.llm.num_layers, cfg.llm.num_heads, cfg.llm.num_kv_heads, cfg.llm.head_dim, cfg.llm.hidden_size
    )
    with torch.no_grad():
        h = prompt.inputs_embeds
        cos_sin = parts.rotary_emb(h, prompt.position_ids)
        for layer in parts.layers:  # sdpa without a mask is causal
            h = layer(h, attention_mask=None, position_embeddings=cos_sin)
        logits = parts.lm_head(parts.norm(h))
    assert (logits - prompt_logits(vlm, prompt)).abs().max() <= 1e-5


# --- (d) bad inputs -------------------------------------------------------------------------------------
def test_bad_inputs_raise_input_error_naming_the_input(vlm, tmp_path):
    image = random_image(40, 40)
    broken_image = tmp_path / "broken.png"
    broken_image.write_bytes(b"not a png at all")
    broken_video = tmp_path / "broken.mp4"
    broken_video.write_bytes(b"\x00\x01garbage" * 64)
    cases = [
        (Sample(id="s1", question="What ?", images=[tmp_path / "missing.jpg"]), "missing.jpg"),
        (Sample(id="s2", question="What ?", images=[broken_image]), "broken.png"),
        (Sample(id="s3", question="   ", images=[image]), "'s3': empty question"),
        (Sample(id="s4", question="What ?"), "'s4': no image or video"),
        (Sample(id="s5", question="What ?", video=broken_video), "broken.mp4"),
        (Sample(id="s6", question="What ?", video=tmp_path / "absent.mp4"), "absent.mp4"),
        (Sample(id="s7", question="What ?", video=[]), "'s7': video has no frames"),
        (Sample(id="s8", question="Compare <image> ?", images=[image]), "'s8': question contains"),
        (Sample(id="s9", question="What ?", images=[image], video=[image]), "'s9': both images and a video"),
    ]
    for sample, named in cases:
        with pytest.raises(InputError) as err:
            vlm.prepare(sample)
        message = str(err.value)
        assert named in message and "\n" not in message, (sample.id, message)


# --- (e) the pretrained path ----------------------------------------------------------------------------
QWEN2_TEXT_CHATML = (  # what the released llava-hf tokenizer_config.json carries: text content only
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_the_processors_chat_template_wins_over_the_tokenizers(vlm, tmp_path):
    """The released layout: the tokenizer's text-only ChatML in tokenizer_config.json and the processor's
    template in chat_template.json.  The processor's is used (the tokenizer's would fail on image content)."""
    import json

    vlm.model.save_pretrained(tmp_path)
    vlm.tokenizer.save_pretrained(tmp_path)
    vlm.image_processor.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN2_TEXT_CHATML}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": vlm.chat_template}))
    cfg = OmegaConf.load(CONFIG)
    cfg.pretrained = str(tmp_path)
    loaded = build_vlm(cfg)
    assert loaded.tokenizer.chat_template == QWEN2_TEXT_CHATML  # the folder reproduces the problem
    assert loaded.chat_template == vlm.chat_template
    sample = Sample(id="img", question=QUESTION, images=[random_image(80, 130)])
    assert torch.equal(loaded.prepare(sample).input_ids, vlm.prepare(sample).input_ids)


def test_saved_checkpoint_loads_through_pretrained(vlm, tmp_path):
    vlm.model.save_pretrained(tmp_path)
    vlm.tokenizer.save_pretrained(tmp_path)
    vlm.image_processor.save_pretrained(tmp_path)
    cfg = OmegaConf.load(CONFIG)
    cfg.pretrained = str(tmp_path)
    loaded = build_vlm(cfg)
    assert loaded.chat_template == vlm.chat_template
    sample = Sample(id="img", question=QUESTION, images=[random_image(80, 130)])
    a, b = vlm.prepare(sample), loaded.prepare(sample)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.visual_index, b.visual_index)
    assert torch.equal(prompt_logits(vlm, a), prompt_logits(loaded, b))
    assert loaded.eos_token_ids == vlm.eos_token_ids

    cfg.pretrained = str(tmp_path / "nowhere")
    with pytest.raises(InputError, match="nowhere"):
        build_vlm(cfg)
