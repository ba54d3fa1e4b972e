"""Shared plumbing for the Hydra entry points (generate, train, evaluate, report, flops, ...)."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from explain_prune.config import check_config
from explain_prune.core import InputError
from explain_prune.synthetic import register_resolvers

register_resolvers()  # ${ep.asset:...} in conf/model/synthetic.yaml must resolve in every entry point

log = logging.getLogger("explain_prune")


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (`-m`, or an experiment that sets hydra.mode)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def set_torch_threads(cfg: Any) -> None:
    """Apply a config's `torch_threads` (null: torch's default) before any model work; on a busy
    small CPU one thread is the fastest and the most stable setting."""
    threads = cfg.get("torch_threads") if hasattr(cfg, "get") else None
    if threads:
        import torch

        torch.set_num_threads(int(threads))


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
INTERNAL_GROUPS = ("hydra",)  # the run-dir layout: not a choice users make


def entry_groups(config_name: str, conf_dir: Path = CONF_DIR) -> dict[str, str | None]:
    """{group: default option} of the primary config's defaults list: the groups this entry point uses."""
    from omegaconf import OmegaConf

    groups: dict[str, str | None] = {}
    for item in OmegaConf.load(conf_dir / f"{config_name}.yaml").get("defaults") or []:
        if isinstance(item, str) or item is None:
            continue
        for key, value in item.items():
            key = str(key).removeprefix("optional ").strip()
            if not key.startswith("override") and key.lstrip("/") not in INTERNAL_GROUPS:
                groups[key.lstrip("/")] = None if value is None else str(value)
    return groups


def options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def unknown_choice(overrides: list[str], conf_dir: Path = CONF_DIR, config_name: str | None = None) -> str | None:
    """The one-line error for the first `group=option` override whose option file does not exist, or
    whose group the entry point (`config_name`) does not use (Hydra's own messages for both run over
    many lines), or None.  Sweeps `a,b` are split; lists (`[a,b]`), Hydra's sweep functions
    (`choice(...)`), interpolations and quoted values are left to Hydra; `+group=option` appends a
    group on purpose and is only checked for the option."""
    used = entry_groups(config_name, conf_dir) if config_name else None
    for override in overrides:
        if override.startswith("-") or "=" not in override:
            continue
        key, value = override.split("=", 1)
        appended = key.startswith("+")
        key = key.lstrip("+~")
        group = conf_dir / key
        if not key or "." in key or any(c in value for c in "[]{}()$'\"") or not group.is_dir():
            continue
        if used is not None and not appended and key not in used and key.split("/")[0] not in used:
            return f"{key}: not a group of {config_name} (its groups: {', '.join(used)})"
        for option in value.split(","):
            if option and not (group / f"{option}.yaml").is_file():
                return f"{key}={option}: no such option (allowed: {', '.join(options(key, conf_dir))})"
    return None


def retention_values(overrides: list[str], config_name: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """`retention=0.25` (a number, or a sweep of numbers) -> `method.retention=0.25`: the retention
    group's options are the paper's named settings (r0.25, ...); any other fraction is the method's own
    setting, so a plain number means that.  Entry points without the group are left alone."""
    if "retention" not in entry_groups(config_name, conf_dir):
        return overrides
    out = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "retention" and value and all(_is_number(v) for v in value.split(",")):
            override = f"method.retention={value}"
        out.append(override)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def entry_help(config_name: str, summary: str, conf_dir: Path = CONF_DIR) -> str:
    """`--help`: what the entry point does and one line per group it uses (Hydra's own help lists
    every group of conf/, including those this entry point cannot take)."""
    lines = [summary.strip(), "", f"Groups (group=option; defaults from conf/{config_name}.yaml):"]
    used = entry_groups(config_name, conf_dir)
    width = max(map(len, used), default=0)
    for group, default in used.items():
        choices = " | ".join(f"{o} (default)" if o == default else o for o in options(group, conf_dir))
        lines.append(f"  {group:<{width}}  {choices or '(none)'}{'' if default else '   (default: none)'}")
    lines += [
        "",
        "Any setting can be overridden as key=value; the composed config, with every setting and its",
        f"default: python -m explain_prune.{config_name} --cfg job.  Hydra's own flags: --hydra-help.",
    ]
    return "\n".join(lines)


def checked_choices(entry: Callable[[], Any]) -> Callable[[], Any]:
    """Outermost decorator of a Hydra entry point (its module `explain_prune.<name>` reads
    conf/<name>.yaml): an unknown group option on the command line is one line and exit 2, before
    Hydra composes anything; `--help` lists the groups this entry point uses."""
    config_name = entry.__module__.rsplit(".", 1)[-1]
    if config_name == "__main__":  # run as `python -m explain_prune.<name>`
        config_name = Path(sys.modules["__main__"].__file__ or "").stem

    @functools.wraps(entry)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs:
            argv = sys.argv[1:] = retention_values(sys.argv[1:], config_name)
            if "--help" in argv or "-h" in argv:
                print(entry_help(config_name, (sys.modules[entry.__module__].__doc__ or "").split("\n\n")[0]))
                sys.exit(0)
            error = unknown_choice(argv, config_name=config_name)
            if error is not None:
                print(f"error: {error}", file=sys.stderr)
                sys.exit(2)
            os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra raises instead of printing its own report
            try:
                return entry(*args, **kwargs)
            except (InputError, OSError, *config_errors()) as err:
                if not getattr(err, "reported", False):  # task() already printed it (a multirun job)
                    print(f"error: {one_line(err)}", file=sys.stderr)
                sys.exit(2)
        return entry(*args, **kwargs)

    return run


def config_errors() -> tuple[type[BaseException], ...]:
    """What Hydra and OmegaConf raise for a bad command line or config (a key that does not
    exist, an unparsable override, a missing value), before or around the task."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return HydraException, OmegaConfBaseException


def one_line(err: BaseException) -> str:
    """An exception's message on one line (Hydra's messages span several: the problem, then a hint),
    naming the override Hydra could not parse."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    override = getattr(err, "override", None)
    return f"{override}: {text}" if isinstance(override, str) else text


def task(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Hydra task: bad input, or an OS error on a file the job reads or writes -> one line on
    stderr and exit code 2 (no traceback);
    always close a W&B run so multirun jobs do not leak into each other.

    In a multirun a bad job must not take the sweep down with it: the error line is printed and
    the InputError re-raised, so Hydra marks that job failed, runs the remaining ones, and exits
    non-zero at the end (a SystemExit would stop the sweep at once)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            if args and isinstance(args[0], Mapping | DictConfig):
                check_config(args[0])  # one line and exit 2 for a bad setting, before any model loads
                set_torch_threads(args[0])
            return fn(*args, **kwargs)
        except (InputError, OSError) as err:  # OSError: an output that cannot be written (read-only, disk full)
            print(f"error: {one_line(err)}", file=sys.stderr)
            if in_multirun():
                err.reported = True  # type: ignore[union-attr]
                raise
            sys.exit(2)
        finally:
            wandb = sys.modules.get("wandb")
            if wandb is not None and getattr(wandb, "run", None) is not None:
                wandb.finish()

    return wrapper
