"""The checks a resume passes before anything in its run folder changes (``check``): the strategy has a gradient fit
to continue; the checkpoint's stored config and data (``datamodules.fingerprint``) are this run's, or
``resume_changes=allow`` continues through the differences; its optimizer is this run's; its weights fit the model.

A changed key that cannot take effect on a resume is put back to the checkpoint's value in the run's config and in
its recorded command line (``overrides.yaml``), and named in one warning, so that ``config.yaml``, the card and its
Reproduce command say what ran: the optimizer's hyper-parameters and the strategy's base LR (``NOT_APPLIED``), which
Lightning restores with the optimizer's param groups and the LR scheduler's base LRs. The schedule's shape, layer-wise
LR multipliers, the loss and the data do take effect (from the first step after the resume point)."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from visionft.checkpoints import DATA_KEY, check_fits, config_changes, read_checkpoint
from visionft.errors import UsageError
from visionft.outputs import write_overrides
from visionft.resume import hydra_quoted, resume_command

log = logging.getLogger("visionft.train")
NOT_APPLIED = ("optimizer.", "strategy.lr")  # keys (or prefixes) a resume takes from the checkpoint's state
OTHER_OPTIMIZER = "optimizer._target_"  # its state cannot be loaded into another optimizer


def resume_path(cfg: DictConfig, out: Path) -> str | None:
    if cfg.ckpt_path:
        return str(cfg.ckpt_path)
    if cfg.resume:
        last = out / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"resume=true but {last} does not exist: set paths.output_dir to the run "
                                    f"directory to resume, or pass ckpt_path=/path/to/file.ckpt")
        return str(last)
    return None


def check(cfg: DictConfig, out: Path, module, dm, overrides: list[str] | None) -> dict | None:
    """Give the module the data's fingerprint (for its checkpoints); for a resume (``resume=true``, ``ckpt_path``),
    refuse what cannot continue (one line), put back unapplied keys, write the command line (``overrides.yaml``), and
    return the ``resumed`` record for ``metrics.json``: the checkpoint, its epoch and step, the changes applied and
    those not applied."""
    module.data_fingerprint = dm.fingerprint()
    if not (cfg.resume or cfg.ckpt_path):
        return None
    if not module.strategy.gradient_fit:
        raise UsageError(nothing_to_resume(cfg, out, module.strategy.name))
    resume = resume_path(cfg, out)
    stored = read_checkpoint(resume, "ckpt_path" if cfg.ckpt_path else "resume=true: last.ckpt")
    hparams = stored.get("hyper_parameters", {})
    changes = config_changes(hparams, OmegaConf.to_container(cfg, resolve=True))
    if stored.get(DATA_KEY) is None:
        log.info("%s holds no fingerprint of its data (saved by an earlier visionft): the data is not compared", resume)
    data = dm.changed_since(stored[DATA_KEY]) if stored.get(DATA_KEY) is not None else []
    if (changes or data) and cfg.get("resume_changes", "refuse") != "allow":
        raise UsageError(refusal(cfg, out, resume, changes, data))
    other = [c for c in changes if key_of(c) == OTHER_OPTIMIZER]
    if other:
        raise UsageError(f"resuming from {resume} with another optimizer ({other[0]}): the checkpoint holds that "
                         f"optimizer's state, which this one cannot take; resume with the optimizer the run used, or "
                         f"start a new run in another folder")
    check_fits(stored, module, f"the checkpoint {resume}")
    kept = {key_of(c): stored_value(hparams, key_of(c)) for c in changes if unapplied(key_of(c))}
    for key, value in kept.items():  # what ran, in the config and in the hyper-parameters later checkpoints keep
        OmegaConf.update(cfg, key, value, force_add=True)
        put(module.hparams, key, value)
    if kept:
        log.warning("resume: %s not applied (the optimizer and LR-scheduler state come from the checkpoint, so its "
                    "values are kept, and recorded in config.yaml, overrides.yaml and the card)",
                    "; ".join(c for c in changes if key_of(c) in kept))
    applied = [c for c in changes if key_of(c) not in kept] + [f"data: {d}" for d in data]
    if applied:
        log.info("resuming with changes (resume_changes=allow): %s", "; ".join(applied))
    write_overrides(pinned(overrides, kept) if overrides is not None else None, out)
    return {"from": str(resume), "epoch": stored.get("epoch"), "step": stored.get("global_step"),
            "changes": applied, "not_applied": [c for c in changes if key_of(c) in kept]}


def nothing_to_resume(cfg: DictConfig, out: Path, name: str) -> str:
    given = f"ckpt_path={cfg.ckpt_path}" if cfg.ckpt_path else "resume=true"
    own = f": `{resume_command(out)}` alone resumes with its own overrides" if not cfg.ckpt_path else ""
    return (f"strategy {name} solves its head in closed form: it has no training to resume ({given}); run it "
            f"without {given.split('=')[0]} into another folder (paths.output_dir=NEW_DIR), or resume with the "
            f"strategy the run used{own}")


def refusal(cfg: DictConfig, out: Path, resume: str, changes: list[str], data: list[str]) -> str:
    said = [*changes, *(f"data: {d}" for d in data)] if changes else data
    listed = f"{'; '.join(said[:4])}{'; ...' if len(said) > 4 else ''}"
    if changes:
        fix = (f"`{resume_command(out)}` alone resumes with the run's own overrides" if not cfg.ckpt_path
               else "resume with the overrides of the run that saved it (its config.yaml)")
        return (f"resuming from {resume} with a config that changes the run ({listed}): {fix}, or pass "
                f"resume_changes=allow to continue anyway")
    return (f"resuming from {resume}, but the data changed since it was saved ({listed}): resume with the data the "
            f"run was trained on, start a new run in another folder, or pass resume_changes=allow to continue anyway")


def key_of(change: str) -> str:
    return change.split(": ", 1)[0]


def unapplied(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in NOT_APPLIED)


def stored_value(hparams: dict, key: str):
    node = hparams
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def put(hparams: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        hparams = hparams.setdefault(part, {})
    hparams[last] = value


def pinned(overrides: list[str], kept: dict) -> list[str]:
    """The command line with each key of ``kept`` set to its kept value (its own overrides of it replaced)."""
    def key(o: str) -> str:
        return o.lstrip("+~").split("=", 1)[0]

    prefix = {key(o): o[:len(o) - len(o.lstrip("+~"))].replace("~", "") for o in overrides}
    return [*(o for o in overrides if key(o) not in kept),
            *(f"{prefix.get(k, '')}{k}={hydra_value(v)}" for k, v in kept.items())]


def hydra_value(v) -> str:
    """``v`` in Hydra's override grammar."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    return hydra_quoted(str(v))
