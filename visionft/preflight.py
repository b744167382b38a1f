"""The command line checked before Hydra runs anything, so that a typo costs one line and no model is built:
unknown group options (listing the valid ones), unknown keys (suggesting the closest existing keys), values of the
wrong type (against the composed default), values out of range or not among the known choices (``RULES``, every
value of a sweep too), an output folder that cannot be written, and the run folder's own checks (inside
``data.root``, in use by another run, holding a run: ``visionft.runfolder``). Nothing heavy (torch, Lightning,
timm) is imported. ``HYDRA_FULL_ERROR=1`` skips these checks and shows Hydra's own report."""
from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from visionft import runfolder
from visionft.resume import split_argv


def group_options(group: str, config_dir: str | None = None) -> list[str]:
    """The options of a config group: visionft's presets plus a user config dir's."""
    from importlib.resources import files

    if not group or "." in group or "/" in group:
        return []
    found = {p.name[:-5] for p in files("visionft.conf").joinpath(group).iterdir() if p.name.endswith(".yaml")} \
        if files("visionft.conf").joinpath(group).is_dir() else set()
    if config_dir and (Path(config_dir) / group).is_dir():
        found |= {p.stem for p in (Path(config_dir) / group).glob("*.yaml")}
    return sorted(found)


def _first_values(overrides: list[str], config_dir: str | None) -> tuple[list[str], str | None]:
    """Each sweep override (a,b,c or range(...)) replaced by its first value (the config one job composes), and
    the first sweep value of a group that is not one of its options."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out, problem = [], None
    for raw, o in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            key = o.get_key_element()
            options = group_options(key, config_dir) if "." not in key else []
            bad = [v for v in values if options and v not in options]
            if bad and problem is None:
                problem = f"{key}={bad[0]} is not an option of the {key} group; valid: {', '.join(options)}"
            out.append(f"{key}={values[0]}")
        else:
            out.append(raw)
    return out, problem


def _compose(overrides: list[str], config_dir: str | None) -> DictConfig:
    from visionft.api import compose

    return compose(overrides, config_dir=config_dir)


def _closest(key: str, base: DictConfig) -> list[str]:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(base, parent) if parent else base
    if not isinstance(node, DictConfig):
        return []
    names = [str(k) for k in node.keys()]
    return [f"{parent}.{n}" if parent else n for n in difflib.get_close_matches(leaf, names, n=3, cutoff=0.6)]


def _type_error(key: str, default, value, raw: str) -> str | None:
    if default is None or value is None or isinstance(default, (DictConfig, list)) or key.startswith("hydra."):
        return None
    expected = type(default)
    ok = (isinstance(value, bool) if expected is bool else
          isinstance(value, int) and not isinstance(value, bool) if expected is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if expected is float else True)
    if ok:
        return None
    return f"{raw} must be {expected.__name__} (the default is {default!r})"


def _count(least: int = 1, null: bool = False):
    return lambda v: (v is None and null) or (isinstance(v, int) and not isinstance(v, bool) and v >= least)


def _real(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False, null: bool = False):
    def ok(v) -> bool:
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            return v is None and null
        return math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    return ok


def _one_of(*choices):
    return lambda v: any(v == c and type(v) is type(c) for c in choices)


PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
              "transformer-engine-float16")  # Lightning's, and its short forms 32, 16, 64, bf16
# key: (accepts the composed value, what it must be); a key absent from the config is not checked
RULES = {
    "data.batch_size": (_count(), "an integer >= 1"),
    "data.eval_batch_size": (_count(null=True), "an integer >= 1 (or null: 2 x batch_size)"),
    "data.num_workers": (_count(0), "an integer >= 0"),
    "data.per_class": (_count(null=True), "an integer >= 1 (images per class), or null for all"),
    "data.image_size": (_count(null=True), "an integer >= 1 (pixels), or null for the backbone's input size"),
    "backbone.image_size": (_count(null=True), "an integer >= 1 (pixels), or null for its pretrained input size"),
    "data.train_size": (_count(), "an integer >= 1"),
    "data.test_size": (_count(), "an integer >= 1"),
    "data.val_fraction": (_real(0, 1, True, True), "in (0, 1)"),
    "data.test_fraction": (_real(0, 1, False, True), "in [0, 1) (0: no test split)"),
    "data.test_from": (_one_of("train", "val"), "train or val (the split a missing test split is carved from)"),
    "data.resident": (_one_of("auto", True, False, "true", "false"), "auto, true or false"),
    "data.sampler": (_one_of(None, "balanced"), "null or balanced (draws every class equally often)"),
    "trainer.max_epochs": (_count(), "an integer >= 1"),
    "trainer.accumulate_grad_batches": (_count(), "an integer >= 1"),
    "trainer.log_every_n_steps": (_count(), "an integer >= 1"),
    "trainer.gradient_clip_val": (_real(0, null=True), "a number >= 0, or null for no clipping"),
    "trainer.precision": (_one_of(*PRECISIONS, 32, 16, 64, "32", "16", "64", "bf16"),
                          f"one of {', '.join(PRECISIONS)}"),
    "strategy.lr": (_real(0, low_open=True), "> 0 and finite (e.g. strategy.lr=5e-4)"),
    "strategy.layer_decay": (_real(0, 1, low_open=True), "in (0, 1]; 1.0 turns it off"),
    "strategy.bn": (_one_of("frozen", "train"), "frozen or train"),
    "loss.label_smoothing": (_real(0, 1, high_open=True), "in [0, 1) (0: off)"),
    "loss.mixup": (_real(0), "a number >= 0 (0: off)"),
    "loss.cutmix": (_real(0), "a number >= 0 (0: off)"),
    "optimizer.weight_decay": (_real(0), "a number >= 0"),
    "scheduler.warmup_epochs": (_real(0), "a number >= 0 (epochs)"),
    "scheduler.min_lr_ratio": (_real(0, 1), "in [0, 1]"),
    "backbone.head_init": (_one_of("zero", "timm"), "zero or timm"),
    "callbacks.mode": (_one_of(None, "min", "max"), "min or max (or null: min for a loss, max otherwise)"),
    "resume_changes": (_one_of("refuse", "allow"), "refuse or allow"),
}


def out_of_range(key: str, value) -> str | None:
    """The one line saying that ``value`` is not a valid ``key``; None when it is (or the key has no rule)."""
    rule = RULES.get(key)
    if rule is None or rule[0](value):
        return None
    return f"{key}={value} must be {rule[1]}"


def _range_problem(overrides: list[str], cfg: DictConfig) -> str | None:
    """The first value out of range: every value of a sweep over a key, then the composed config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override() and o.is_discrete_sweep() and o.get_key_element().lstrip("+~") in RULES:
            for value in o.sweep_iterator():
                if problem := out_of_range(o.get_key_element().lstrip("+~"), value):
                    return problem
    absent = object()
    for key in RULES:
        try:
            value = OmegaConf.select(cfg, key, default=absent)
        except Exception:  # noqa: BLE001 - an interpolation that cannot be resolved here: the run reports it
            continue
        if value is not absent and (problem := out_of_range(key, value)):
            return problem
    return None


def _unwritable(path: str | None) -> str | None:
    """Create the output folder (the run would) and a file in it; the reason when that fails."""
    import tempfile

    if not path:
        return None
    try:
        Path(path).expanduser().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=Path(path).expanduser()):
            pass
    except OSError as e:
        return f"paths.output_dir={path} cannot be written ({e.strerror}): choose a folder you can write to"
    return None


def check(argv: list[str]) -> str | None:
    """The first problem of the command line, as one line naming it and the fix; None when it is fine."""
    split = split_argv(argv)
    if split is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return None
    overrides, config_dir = split
    try:
        return _check(overrides, config_dir, "-m" in argv or "--multirun" in argv)
    except Exception:  # noqa: BLE001 - anything unexpected here: let Hydra run and report it its own way
        return None


def _check(overrides: list[str], config_dir: str | None, multirun: bool = False) -> str | None:
    from hydra.errors import ConfigCompositionException, MissingConfigException

    overrides = [o for o in overrides if not o.startswith("hydra") or o.startswith("hydra.searchpath")]
    swept = overrides
    try:
        overrides, problem = _first_values(overrides, config_dir)
    except Exception:  # noqa: BLE001 - not Hydra's override grammar: Hydra reports it
        return None
    if problem:
        return problem
    groups = [o for o in overrides if "=" in o and (o.startswith("hydra.searchpath") or group_options(
        o.split("=", 1)[0].lstrip("+~"), config_dir))]
    try:
        base = _compose(groups, config_dir)
        cfg = _compose(overrides, config_dir)
    except MissingConfigException as e:
        group, _, value = str(e.missing_cfg_file or "").partition("/")
        options = ", ".join(e.options or group_options(group, config_dir)) or "see `python -m visionft --help`"
        return f"{group}={value} is not an option of the {group} group; valid: {options}"
    except ConfigCompositionException as e:
        m = re.search(r"Could not (?:override|delete) '([^']+)'", str(e))
        if not m:
            return None
        key = m.group(1)
        try:
            base = _compose(groups, config_dir)
        except Exception:  # noqa: BLE001 - the key is a group name typo: compare with the defaults
            base = _compose([], config_dir)
        close = _closest(key, base)
        hint = f"did you mean {' or '.join(close)}?" if close else "`python -m visionft --cfg job` lists every key"
        return f"unknown key {key}: {hint}"
    for raw in overrides:
        key = raw.split("=", 1)[0].lstrip("+~")
        if "=" in raw and raw not in groups and not key.startswith("hydra"):
            problem = _type_error(key, OmegaConf.select(base, key, throw_on_resolution_failure=False),
                                  OmegaConf.select(cfg, key, throw_on_resolution_failure=False), raw)
            if problem:
                return problem
    out = OmegaConf.select(cfg, "paths.output_dir", throw_on_resolution_failure=False)
    return (_range_problem(swept, cfg) or runfolder.inside_data(cfg, out, multirun) or _unwritable(out)
            or runfolder.claim_before_hydra(cfg, out, multirun))
