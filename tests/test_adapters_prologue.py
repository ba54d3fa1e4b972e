"""Every family's `prepare` opens with the same validated prologue (`VLM._read_sample`): one rule,
one one-line InputError naming the sample, whichever model runs the sample."""

from __future__ import annotations

import pytest
from helpers import TINY_MODELS, model_cfg, random_image

from explain_prune.core import InputError
from explain_prune.models import Sample, build_vlm


@pytest.fixture(scope="module", params=TINY_MODELS)
def vlm(request):
    return build_vlm(model_cfg(request.param))


def error_of(vlm, sample: Sample) -> str:
    with pytest.raises(InputError) as err:
        vlm.prepare(sample)
    message = str(err.value)
    assert "\n" not in message and repr(sample.id) in message
    return message


def test_images_and_a_video_together_are_rejected(vlm):
    image = random_image(0, 56, 56)
    for video in ([image, image], "clip.mp4"):
        sample = Sample(id="both", question="What is this ?", images=[image], video=video)
        assert "both images and a video" in error_of(vlm, sample)


def test_the_rule_fires_before_any_file_is_read(vlm, tmp_path):
    """Both given, both missing: the sample is refused for what it is, not for a missing file."""
    sample = Sample(id="early", question="What ?", images=[tmp_path / "no.png"], video=tmp_path / "no.mp4")
    assert "both images and a video" in error_of(vlm, sample)


@pytest.mark.parametrize("question", ["", "   ", "\n\t ", None])
def test_empty_or_blank_questions_are_rejected(vlm, question):
    sample = Sample(id="blank", question=question, images=[random_image(1, 56, 56)])
    assert "empty question" in error_of(vlm, sample)


def test_no_visual_input_is_rejected(vlm):
    assert "no image or video" in error_of(vlm, Sample(id="text", question="What ?"))


def test_a_valid_sample_passes_with_its_question_stripped(vlm):
    sample = Sample(id="ok", question="  What color is it ?  ", images=[random_image(2, 56, 56)])
    prompt = vlm.prepare(sample)
    assert prompt.sample_id == "ok" and prompt.num_visual > 0
    assert vlm._read_sample(sample)[0] == "What color is it ?"


def translucent_image():
    """An RGBA image whose left half is fully transparent (with a colour under it) and right half opaque."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(random_image(5, 84, 84).convert("RGBA")).copy()
    pixels[:, :42, 3] = 0
    return Image.fromarray(pixels, "RGBA")


def test_transparency_is_flattened_as_each_familys_reference_does(vlm, tmp_path):
    """Qwen2-VL and LLaVA-OneVision composite transparency onto white (transformers' convert_to_rgb,
    qwen-vl-utils' to_rgb); VILA's own code drops the alpha channel.  From a PIL image or a PNG file."""
    import numpy as np
    import torch
    from transformers.image_transforms import convert_to_rgb

    rgba = translucent_image()
    rgba.save(tmp_path / "translucent.png")
    white = np.asarray(convert_to_rgb(rgba, return_numpy=True))
    dropped = np.asarray(rgba.convert("RGB"))
    assert not np.array_equal(white, dropped)  # the image tells the two rules apart
    reference = {"qwen2vl": white, "llava_onevision": white, "vila": dropped}[vlm.family]
    for given in (rgba, tmp_path / "translucent.png"):
        _, (image,) = vlm._read_sample(Sample(id="rgba", question="What is this ?", images=[given]))
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), reference)
    from PIL import Image

    as_reference = vlm.prepare(Sample(id="ref", question="What is this ?", images=[Image.fromarray(reference)]))
    flattened = vlm.prepare(Sample(id="rgba", question="What is this ?", images=[rgba]))
    assert torch.equal(flattened.inputs_embeds, as_reference.inputs_embeds)
