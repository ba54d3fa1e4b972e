"""The synthetic grid visual-QA task (generator.py) and the small MLLM trained on it (fit.py).

`register_resolvers()` adds the OmegaConf resolver `ep.asset`, used by conf/model/synthetic.yaml:
`${ep.asset:synthetic_model}` is the absolute path of `explain_prune/assets/synthetic_model`, so the
shipped model is found whatever the working directory.  It must run before that config value is
read (this module calls it on import; entry points that load model configs import it first).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
MODEL_DIR = ASSETS_DIR / "synthetic_model"


def asset_path(name: str) -> str:
    """Absolute path of a file or directory shipped under explain_prune/assets/."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"asset name must be a relative path inside explain_prune/assets, got {name!r}")
    return str(ASSETS_DIR / name)


def register_resolvers() -> None:
    """Register `ep.asset` (idempotent)."""
    if not OmegaConf.has_resolver("ep.asset"):
        OmegaConf.register_new_resolver("ep.asset", asset_path)


register_resolvers()

__all__ = ["ASSETS_DIR", "MODEL_DIR", "asset_path", "register_resolvers"]
