"""VILA1.5 (Llama-3-VILA1.5-8B) built in-project from transformers parts.

transformers has no VILA class, and NVlabs/VILA pins transformers 4.36, so the model is assembled
here from `SiglipVisionModel` (vision tower), VILA's `mlp_downsample` projector and
`LlamaForCausalLM`, and loaded from the ORIGINAL checkpoint folder layout.  Split by role, as
transformers splits a model folder:

- `modeling_vila`: the projector and `VilaForConditionalGeneration` (tower -> projector -> Llama);
- `image_processing_vila`: `VilaImageProcessor` (VILA's `process_image` for a SigLIP tower);
- `conversion_vila`: `load_original`, the original folder layout -> model and tokenizer;
- `adapter`: the `Vila` adapter (llama_3 prompt, the `VLM` contract) and the tiny random model.

Facts reproduced from the NVlabs/VILA sources are cited in each module, next to the code.
VILA1.5-8B was trained with google/siglip-so400m-patch14-384, mm_vision_select_feature
"cls_patch", mm_vision_select_layer -2, mm_projector mlp_downsample, image_aspect_ratio "resize"
and the llama_3 template (scripts/v1_5/release/8b/1_mm_align.sh, 3_sft.sh).
"""

from explain_prune.models.vila.adapter import SYSTEM, Vila, build_tiny
from explain_prune.models.vila.image_processing_vila import VilaImageProcessor
from explain_prune.models.vila.modeling_vila import (
    MlpDownsampleProjector,
    VilaForConditionalGeneration,
)

__all__ = ["SYSTEM", "MlpDownsampleProjector", "Vila", "VilaForConditionalGeneration", "VilaImageProcessor", "build_tiny"]
