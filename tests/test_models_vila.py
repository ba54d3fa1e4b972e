"""VILA1.5 built in-project: projector geometry, preprocessing, prompt layout, original-layout loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from vila_checkpoint import save_original

from explain_prune.core import InputError
from explain_prune.models import Sample, build_vlm
from explain_prune.models.vila import (
    SYSTEM,
    MlpDownsampleProjector,
    Vila,
    VilaImageProcessor,
    build_tiny,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "model" / "tiny_vila.yaml"


@pytest.fixture(scope="module")
def cfg():
    return OmegaConf.load(CONF)


@pytest.fixture(scope="module")
def vlm(cfg):
    return build_vlm(cfg)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def checkpoint(vlm, tmp_path_factory):
    return save_original(vlm, tmp_path_factory.mktemp("vila_ckpt") / "Llama-3-VILA1.5-tiny")


def naive_merge(x: torch.Tensor) -> torch.Tensor:
    """Reference 2x2 merge written as loops: zero-pad to even, token (j*m + i) = concat of grid cells
    (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1) with i the row pair and j the column pair."""
    b, n, c = x.shape
    s = int(round(n**0.5))
    m = (s + 1) // 2
    grid = torch.zeros(b, 2 * m, 2 * m, c, dtype=x.dtype)
    grid[:, :s, :s] = x.reshape(b, s, s, c)
    out = torch.zeros(b, m * m, 4 * c, dtype=x.dtype)
    for i in range(m):
        for j in range(m):
            cells = [grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j], grid[:, 2 * i + 1, 2 * j + 1]]
            out[:, j * m + i] = torch.cat(cells, dim=-1)
    return out


# --- projector ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [27, 4])
def test_downsample_matches_naive_loop(side):
    torch.manual_seed(0)
    x = torch.randn(2, side * side, 5)
    proj = MlpDownsampleProjector(5, 8)
    merged = proj.layers[0](x)
    m = (side + 1) // 2
    assert merged.shape == (2, m * m, 20)
    assert torch.equal(merged, naive_merge(x))
    if side == 27:  # the padded last row/column contribute zeros to the last row-pair / column-pair tokens
        assert torch.all(merged[:, 13 * m :, 5:10] == 0) and torch.all(merged[:, 13::m, 10:20] == 0)


def test_projector_parameter_names_are_vilas():
    names = set(MlpDownsampleProjector(6, 8).state_dict())
    assert names == {f"layers.{i}.{p}" for i in (1, 2, 4) for p in ("weight", "bias")}
    proj = MlpDownsampleProjector(6, 8)
    assert proj.layers[1].normalized_shape == (24,) and proj.layers[2].in_features == 24


def test_vision_feature_is_penultimate_layer(vlm):
    tower = vlm.model.vision_tower
    pixels = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        h = tower.embeddings(pixels)
        for layer in tower.encoder.layers[: len(tower.encoder.layers) - 1]:
            h = layer(h, None)
        feats = vlm.model.vision_features(pixels)
    assert feats.shape == (1, 729, tower.config.hidden_size)
    torch.testing.assert_close(feats, h, rtol=0, atol=1e-6)


# --- preprocessing -------------------------------------------------------------------------------------
def test_resize_stretches_whole_image_and_normalises_with_half():
    img = np.zeros((300, 500, 3), dtype=np.uint8)
    img[:, :250] = (255, 0, 0)
    img[:, 250:] = (0, 0, 255)
    px = VilaImageProcessor(aspect_ratio="resize")([Image.fromarray(img)])
    assert px.shape == (1, 3, 384, 384) and px.dtype == torch.float32
    left, right = px[0, :, :, :180], px[0, :, :, 204:]  # the colour edge lands at column 192: no crop, no pad
    assert torch.all(left[0] == 1) and torch.all(left[2] == -1)
    assert torch.all(right[0] == -1) and torch.all(right[2] == 1)


def test_pad_fills_with_mean_colour():
    img = Image.new("RGB", (400, 200), (255, 255, 255))
    px = VilaImageProcessor(aspect_ratio="pad")([img])
    gray = (127 / 255 - 0.5) / 0.5
    torch.testing.assert_close(px[0, :, :90], torch.full((3, 90, 384), gray), rtol=0, atol=1e-6)
    assert torch.all(px[0, :, 192] == 1)
    with pytest.raises(InputError, match="dynamic"):
        VilaImageProcessor(aspect_ratio="dynamic")


# --- prompts -------------------------------------------------------------------------------------------
def test_image_prompt_has_196_tokens_and_vilas_layout(vlm, image):
    prompt = vlm.prepare(Sample(id="s1", question="What color is the image?", images=[image]))
    assert prompt.num_visual == 196 and prompt.visual_grid == (1, 14, 14)
    vi = prompt.visual_index
    assert torch.equal(vi, torch.arange(int(vi[0]), int(vi[0]) + 196))
    assert torch.equal(prompt.position_ids, torch.arange(prompt.length).unsqueeze(0))
    assert prompt.position_ids.shape == (1, prompt.length) and prompt.attention_mask.sum() == prompt.length
    assert prompt.meta["visual_token_order"] == "column_major"
    tok = vlm.tokenizer
    ids = prompt.input_ids[0]
    assert tok.decode(ids[prompt.instruction_index]) == "What color is the image ?"
    text = tok.decode([i for i in ids.tolist() if i != vlm.placeholder_id])
    assert text.startswith("<|begin_of_text|> <|start_header_id|> system <|end_header_id|> You are a helpful")
    assert text.endswith("<|eot_id|> <|start_header_id|> user <|end_header_id|> What color is the image ? "
                         "<|eot_id|> <|start_header_id|> assistant <|end_header_id|>")
    # visual positions carry the projector output of the preprocessed image, text positions the LM table
    with torch.no_grad():
        feats = vlm.model.encode_images(vlm.image_processor([image]))[0]
        text_emb = vlm.decoder.embed_tokens(ids)
    torch.testing.assert_close(prompt.inputs_embeds[0, vi], feats, rtol=0, atol=1e-6)
    mask = torch.ones(prompt.length, dtype=torch.bool)
    mask[vi] = False
    assert torch.equal(prompt.inputs_embeds[0, mask], text_emb[mask])
    assert prompt.inputs_embeds[0, vi].std() > 0


def test_video_frames_give_196_tokens_each(vlm, cfg, image, tmp_path):
    frames = [image.rotate(10 * k) for k in range(3)]
    prompt = vlm.prepare(Sample(id="v", question="What happens?", video=frames))
    assert prompt.num_visual == 3 * 196 and prompt.visual_grid == (3, 14, 14)

    import av
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * k, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    from_file = vlm.prepare(Sample(id="f", question="What happens?", video=str(path)))
    assert from_file.num_visual == cfg.video.num_frames * 196 == 4 * 196
    two = build_vlm(cfg, modality={"num_frames": 2})
    assert two.prepare(Sample(id="f", question="What happens?", video=str(path))).visual_grid == (2, 14, 14)


def llama3_like_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level stand-in for the Llama-3 tokenizer's relevant behaviour: BOS added by the
    post-processor, newline tokens, and no "<image>" token in the vocabulary."""
    special = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|reserved_special_token_0|>", "<|endoftext|>"]
    words = ["\n", "\n\n", "[UNK]", "system", "user", "assistant", "what", "is", "here", "?"]
    words += sorted({w for w in SYSTEM.split() if not w.startswith("<")} | {"."})
    vocab = {t: i for i, t in enumerate(dict.fromkeys(special + words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[.,?]"), behavior="isolated"),
    ])
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", vocab["<|begin_of_text|>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   additional_special_tokens=special[1:5])


def test_tokenisation_follows_tokenizer_image_token(cfg, image):
    tok = llama3_like_tokenizer()
    model = build_tiny(cfg.tiny, tok, torch.float32, "sdpa")
    vlm = Vila("llama3-like", model, tok, VilaImageProcessor(), num_frames=2, frame_sampling="linspace")
    prompt = vlm.prepare(Sample(id="x", question="What is here?", images=[image, image]))
    v = tok.get_vocab()
    ids = prompt.input_ids[0].tolist()
    img = v["<|reserved_special_token_0|>"]
    head = [v["<|begin_of_text|>"], v["<|begin_of_text|>"], v["<|start_header_id|>"], v["system"],
            v["<|end_header_id|>"], v["\n\n"]]
    assert ids[:6] == head  # BOS added by the tokenizer in front of the literal <|begin_of_text|>, as in VILA
    role = [v["<|eot_id|>"], v["<|start_header_id|>"], v["user"], v["<|end_header_id|>"], v["\n\n"]]
    hits = [k for k in range(len(ids)) if ids[k : k + 5] == role]
    assert len(hits) == 1  # system turn closed by <|eot_id|>, then the user header
    start = hits[0] + 5
    assert ids[start : start + 196] == [img] * 196 and ids[start + 196] == v["\n"]
    assert ids[start + 197 : start + 393] == [img] * 196 and ids[start + 393] == v["\n"]
    question = [v["[UNK]"], v["is"], v["here"], v["?"]]  # "What" is not in this vocabulary
    tail = [v["<|eot_id|>"], v["<|start_header_id|>"], v["assistant"], v["<|end_header_id|>"], v["\n\n"]]
    assert ids[start + 394 :] == question + tail
    assert prompt.instruction_index.tolist() == list(range(start + 394, start + 398))  # the "\n" is skipped
    assert prompt.num_visual == 392 and prompt.visual_grid == (2, 14, 14)
    assert v["<|eot_id|>"] in vlm.eos_token_ids


# --- checkpoint layout -----------------------------------------------------------------------------------
def test_original_layout_roundtrip_gives_identical_logits(vlm, cfg, checkpoint, image):
    top = json.loads((checkpoint / "config.json").read_text())
    assert top["architectures"] == ["LlavaLlamaModel"] and top["model_type"] == "llava_llama"
    assert top["mm_vision_select_layer"] == -2 and top["image_aspect_ratio"] == "resize"
    assert json.loads((checkpoint / "mm_projector" / "config.json").read_text())["mm_projector_type"] == "mlp_downsample"
    with safe_open(str(checkpoint / "mm_projector" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == {f"layers.{i}.{p}" for i in (1, 2, 4) for p in ("weight", "bias")}
    with safe_open(str(checkpoint / "vision_tower" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("vision_model.") for k in f.keys())
    assert (checkpoint / "vision_tower" / "preprocessor_config.json").is_file()
    assert (checkpoint / "llm" / "tokenizer.json").is_file()

    loaded = build_vlm(OmegaConf.merge(cfg, {"pretrained": str(checkpoint)}))
    assert isinstance(loaded, Vila) and loaded.num_frames == cfg.video.num_frames
    sample = Sample(id="s", question="What color is the image?", images=[image])
    a, b = vlm.prepare(sample), loaded.prepare(sample)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.inputs_embeds, b.inputs_embeds)
    with torch.no_grad():
        la = vlm.model(inputs_embeds=a.inputs_embeds, position_ids=a.position_ids, attention_mask=a.attention_mask).logits
        lb = loaded.model(inputs_embeds=b.inputs_embeds, position_ids=b.position_ids, attention_mask=b.attention_mask).logits
    assert torch.equal(la, lb)
    assert loaded.eos_token_ids == vlm.eos_token_ids


def test_generate_reference_is_greedy_decoding(vlm, image):
    prompt = vlm.prepare(Sample(id="g", question="What color is the image?", images=[image]))
    out = vlm.generate_reference(prompt, max_new_tokens=4)
    embeds, tokens = prompt.inputs_embeds, []
    with torch.no_grad():
        for _ in range(4):
            pos = torch.arange(embeds.shape[1]).unsqueeze(0)
            nxt = int(vlm.model(inputs_embeds=embeds, position_ids=pos).logits[0, -1].argmax())
            tokens.append(nxt)
            if nxt in vlm.eos_token_ids:
                break
            embeds = torch.cat([embeds, vlm.embed_text(torch.tensor([[nxt]]))], dim=1)
    assert out.tolist() == tokens


# --- bad input --------------------------------------------------------------------------------------------
def test_bad_samples_raise_input_error(vlm, image, tmp_path):
    cases = [
        (Sample(id="q", question="   ", images=[image]), "empty question"),
        (Sample(id="n", question="What?"), "no image or video"),
        (Sample(id="m", question="What?", images=[str(tmp_path / "missing.png")]), "missing.png"),
        (Sample(id="e", question="What?", video=[]), "video has no frames"),
        (Sample(id="vm", question="What?", video=str(tmp_path / "absent.mp4")), "absent.mp4"),
    ]
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00not a video" * 50)
    cases.append((Sample(id="c", question="What?", video=str(corrupt)), "corrupt.mp4"))
    for sample, needle in cases:
        with pytest.raises(InputError, match=needle):
            vlm.prepare(sample)


def test_bad_checkpoints_raise_input_error(cfg, checkpoint, tmp_path):
    with pytest.raises(InputError, match="nowhere"):
        build_vlm(OmegaConf.merge(cfg, {"pretrained": str(tmp_path / "nowhere")}))
    partial = tmp_path / "partial"
    shutil.copytree(checkpoint, partial)
    shutil.rmtree(partial / "vision_tower")
    with pytest.raises(InputError, match="vision_tower"):
        build_vlm(OmegaConf.merge(cfg, {"pretrained": str(partial)}))
    wrong = tmp_path / "wrong"
    shutil.copytree(checkpoint, wrong)
    (wrong / "mm_projector" / "config.json").write_text(json.dumps({"mm_projector_type": "mlp2x_gelu"}))
    with pytest.raises(InputError, match="mlp2x_gelu"):
        build_vlm(OmegaConf.merge(cfg, {"pretrained": str(wrong)}))
    patch = tmp_path / "patch"
    shutil.copytree(checkpoint, patch)
    top = json.loads((patch / "config.json").read_text())
    top["mm_vision_select_feature"] = "patch"
    (patch / "config.json").write_text(json.dumps(top))
    with pytest.raises(InputError, match="728"):
        build_vlm(OmegaConf.merge(cfg, {"pretrained": str(patch)}))


def test_the_original_checkpoints_conversation_is_a_config_choice(cfg):
    """Llama-3-VILA1.5-8B was trained on the NVlabs/VILA vila1.5 branch, whose llama_3 template closes turns
    with <|end_of_text|> and opens the answer with a *system* header; the -Fix checkpoint (main branch)
    uses <|eot_id|> and an assistant header.  `model.conversation` picks one (conf/model/vila15.yaml: the
    original's).  (The tiny vocabulary has no <|end_of_text|>, so the check is on the prompt text.)"""
    original = build_vlm(OmegaConf.merge(cfg, {"conversation": "llama_3_vila1.5"}))
    fixed = build_vlm(cfg)
    header = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant."
    for vlm, sep, answer_role in ((original, "<|end_of_text|>", "system"), (fixed, "<|eot_id|>", "assistant")):
        text = vlm.prompt_text("What color?", 1)
        assert text.startswith(header)
        assert text.endswith(f"{sep}<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat color?"
                             f"{sep}<|start_header_id|>{answer_role}<|end_header_id|>\n\n")
        assert text.count(sep) == 2 and vlm.conversation.sep == sep
    assert OmegaConf.load(CONF.parent / "vila15.yaml").conversation == "llama_3_vila1.5"
