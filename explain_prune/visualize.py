"""Relevance heat-maps: `python -m explain_prune.visualize [overrides]` (conf/visualize.yaml).

One sample — an image / a video + a question, or sample `synthetic.index` of the synthetic task —,
R_v (Eq. 1) and, given an f_θ file, R̃_v painted over the image / frames with the top-50 % and top-25 %
kept tokens (paper Fig. 2 / App. A).  Writes a PNG and a JSON of what it shows.  The work is in
explain_prune.explain.heatmap.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from explain_prune.cli import checked_choices, task
from explain_prune.core import InputError, Sample, load_image


def input_sample(cfg: DictConfig) -> Sample:
    """The sample to explain, checked before any model is loaded: image= / video= + question=, or
    sample `synthetic.index` of the synthetic stream.  A video stays a path here (see `run`)."""
    image, video, question = cfg.get("image"), cfg.get("video"), cfg.get("question")
    if image is not None and video is not None:
        raise InputError("give image=<path> or video=<path>, not both")
    if image is not None or video is not None:
        if not question or not str(question).strip():
            raise InputError("question=<text> is needed with image= / video=")
        if video is not None:
            if not Path(str(video)).is_file():
                raise InputError(f"video file not found: {video}")
            return Sample(id=Path(str(video)).stem, question=str(question), video=str(video))
        paths = list(image) if isinstance(image, (list, ListConfig)) else [image]
        images = [load_image(str(p)) for p in paths]
        return Sample(id=Path(str(paths[0])).stem, question=str(question), images=images)
    from explain_prune.synthetic.generator import synthetic_config
    from explain_prune.synthetic.generator import make_sample

    syn = cfg.synthetic
    index = syn.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise InputError(f"synthetic.index must be a non-negative integer, got {index!r}")
    generator = syn.get("generator")
    generator = OmegaConf.to_container(generator, resolve=True) if generator is not None else {}
    return make_sample(synthetic_config(generator), int(syn.seed), index)


def run(cfg: DictConfig) -> Path:
    """Compute the maps and write `cfg.out` (PNG) and its JSON twin; returns the PNG path."""
    from explain_prune.core import write_json_atomic
    from explain_prune.data.video import read_frames
    from explain_prune.explain import heatmap
    from explain_prune.methods import build_method, check_retention
    from explain_prune.models import build_vlm

    retentions = [check_retention(r) for r in cfg.retentions]
    gae = build_method("gae", 1.0, head_reduce=cfg.head_reduce, clamp=bool(cfg.clamp), max_new_tokens=int(cfg.max_new_tokens))
    ours = build_method("ours", 1.0, checkpoint=str(cfg.checkpoint)) if cfg.get("checkpoint") else None
    out = Path(str(cfg.out))
    if out.suffix.lower() != ".png":
        raise InputError(f"out must name a .png file, got {out}")
    sample = input_sample(cfg)
    vlm = build_vlm(cfg.model, modality=cfg.modality)
    if isinstance(sample.video, str):  # the frames the model sees: its frame budget and sampling rule
        sample.video = read_frames(sample.video, vlm.num_frames, vlm.frame_sampling)
    pictures = list(sample.video if sample.video is not None else sample.images)
    exp = heatmap.explain(vlm, sample, pictures, gae, ours, retentions)
    fig = heatmap.figure(exp, retentions)
    heatmap.save_png(fig, out, dpi=int(cfg.dpi))
    write_json_atomic(out.with_suffix(".json"), heatmap.record(exp))
    print(f"Q: {sample.question}  A: {exp.answer}" + (f"  (reference: {sample.answer})" if sample.answer else ""))
    for scorer in exp.scorers:
        kept = ", ".join(f"top-{r:.0%}: {scorer.answers[r]!r}" for r in retentions)
        print(f"{scorer.name}: answers from the kept tokens only — {kept}")
    print(f"heat-map: {out}")
    return out


@checked_choices
@hydra.main(version_base="1.3", config_path="../conf", config_name="visualize")
@task
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
