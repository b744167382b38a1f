"""Checkpoints visionft writes and reads: the final model's weights as a Lightning-format file (written atomically),
and the stored run config read back safely. Checkpoints are loaded weights-only, and nothing read from one is
instantiated unless its ``_target_`` is one of visionft's own presets (``conf/<group>/*.yaml``): a checkpoint
cannot make visionft call an arbitrary function."""
from __future__ import annotations

import io
from functools import cache
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, ListConfig, OmegaConf

from visionft.atomic import replacing
from visionft.atomic import write_synced as _write_bytes
from visionft.errors import UsageError
from visionft.resume import resume_command

DATA_KEY = "visionft_data"  # a checkpoint's data fingerprint (``ClassificationDataModule.fingerprint``)


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over it: a crash or a
    failed write (full disk: ``DiskFull``) leaves the previous file, never a truncated one, at ``path``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialized first: a failing disk then surfaces as the OSError of a plain write
    run = Path(path).parent.parent if Path(path).parent.name == "checkpoints" else None
    then = f"resume with `{resume_command(run)}`" if run else "resume with resume=true"
    with replacing(path, "checkpoint", then) as tmp:
        _write_bytes(tmp, buffer.getbuffer())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes (``atomic_torch_save``) and weights-only loads."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage (fsspec): Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def read_checkpoint(path, what: str = "checkpoint") -> dict:
    """A checkpoint loaded weights-only (plain tensors and containers; nothing unpickled can run code), or a
    one-line ValueError saying why it cannot be used."""
    import pickle

    if not Path(path).is_file():
        raise FileNotFoundError(f"{what}={path} does not exist")
    if Path(path).stat().st_size == 0:
        raise UsageError(f"{what}={path} is an empty file (0 bytes): a write that never finished; use another "
                         f"checkpoint (best.ckpt, last.ckpt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise UsageError(f"{what}={path} holds pickled Python objects, which visionft never loads (unpickling "
                             f"can run code): use a checkpoint saved with plain tensors "
                             "(any visionft checkpoint)") from None
        raise unreadable(path, what, e) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise unreadable(path, what, e) from None


def unreadable(path, what: str, e: Exception) -> UsageError:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
    return UsageError(f"{what}={path} is not a readable checkpoint ({reason}): it is corrupt or truncated; use "
                      f"another one (best.ckpt, last.ckpt)")


def run_checkpoint(path: str | Path) -> Path:
    """The checkpoint of a run directory's final model: the one its ``metrics.json`` names (looked up in the
    directory's own ``checkpoints/``, so a moved run still resolves), else ``final.ckpt`` (a probe or WiSE-FT made
    it), ``best.ckpt``, ``last.ckpt``. A file is returned as it is."""
    import json

    path = Path(path)
    if not path.is_dir():
        return path
    named = []
    try:
        named = [Path(json.loads((path / "metrics.json").read_text()).get("final_checkpoint") or "").name]
    except (OSError, ValueError, AttributeError):
        pass
    found = [path / "checkpoints" / n for n in [*filter(None, named), "final.ckpt", "best.ckpt", "last.ckpt"]
             if (path / "checkpoints" / n).is_file()]
    if not found:
        raise FileNotFoundError(f"{path} has no checkpoints/final.ckpt, best.ckpt or last.ckpt: pass a run "
                                f"directory or a .ckpt")
    return found[0]


def check_fits(ckpt: dict, module, what: str) -> None:
    """Refuse, in one line, a checkpoint whose weights do not fit the model this run built (another dataset's
    classes, another backbone or strategy)."""
    mine, theirs = module.state_dict(), ckpt.get("state_dict", {})
    shapes = [f"{k} is {tuple(theirs[k].shape)} there, {tuple(v.shape)} here" for k, v in mine.items()
              if k in theirs and tuple(theirs[k].shape) != tuple(v.shape)]
    missing, extra = [k for k in mine if k not in theirs], [k for k in theirs if k not in mine]
    if shapes or missing or extra:
        detail = shapes[:2] or [f"missing {', '.join(missing[:2])}" if missing
                                else f"unexpected {', '.join(extra[:2])}"]
        raise UsageError(f"{what} does not fit the model of this run ({'; '.join(detail)}): resume with the "
                         f"overrides that run used (data, backbone, strategy), or start a new run without it")


# what defines a run: resuming with other values would silently continue a different run
RUN_DEFINING = ("data", "backbone", "strategy", "loss", "optimizer", "scheduler", "seed")
RUN_NEUTRAL = ("data.num_workers", "data.pin_memory", "data.eval_batch_size", "data.cache_dir")


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


RUN_DEFINING_KEYS = ("trainer.accumulate_grad_batches", "trainer.precision", "trainer.limit_train_batches",
                     "trainer.gradient_clip_val", "deterministic")


def config_changes(stored: dict, current: dict) -> list[str]:
    """``key: stored -> current`` for every run-defining setting that differs between a checkpoint and this run."""
    def pick(cfg: dict) -> dict:
        out = _flat({k: cfg.get(k) for k in RUN_DEFINING})
        for key in RUN_DEFINING_KEYS:
            node = cfg
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            out[key] = node
        return out

    old, new = pick(stored), pick(current)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith(RUN_NEUTRAL)]


def save_weights(module, path: Path) -> str:
    """The module's weights as a Lightning-format checkpoint (state_dict, hyper-parameters, visionft metadata) for
    a final model no Trainer saved (a probe without gradient epochs, a WiSE-FT choice)."""
    import lightning

    attached, data = module._trainer is not None, getattr(module, "data_fingerprint", None)
    atomic_torch_save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                       "visionft": module.meta, **({DATA_KEY: data} if data is not None else {}),
                       "epoch": module.trainer.current_epoch if attached else 0,
                       "global_step": module.trainer.global_step if attached else 0,
                       "pytorch-lightning_version": lightning.__version__}, path)
    return str(path)


@cache
def preset_targets(group: str) -> frozenset[str]:
    """The ``_target_`` of every preset in visionft's config group ``group``."""
    from importlib.resources import files

    out = set()
    for entry in files("visionft.conf").joinpath(group).iterdir():
        if entry.name.endswith(".yaml"):
            target = (OmegaConf.create(entry.read_text()) or {}).get("_target_")
            if target:
                out.add(str(target))
    return frozenset(out)


def _nested_targets(node, where: str) -> list[str]:
    found = []
    if isinstance(node, DictConfig):
        for k, v in node.items_ex(resolve=False):
            if k == "_target_" and where:
                found.append(f"{where}._target_={v}")
            found += _nested_targets(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            found += _nested_targets(v, f"{where}[{i}]")
    return found


def stored_node(hparams: dict, group: str, source: str) -> DictConfig:
    """``hparams[group]`` of a checkpoint, checked before anything instantiates it: its ``_target_`` must be one of
    visionft's presets for that group and nothing inside it may name another target."""
    node = OmegaConf.create(hparams).get(group)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise UsageError(f"{source}: its stored config has no {group} entry to rebuild from")
    target, allowed = str(node._target_), preset_targets(group)
    nested = _nested_targets(node, "")
    if target not in allowed or nested:
        bad = nested[0] if nested else f"{group}._target_={target}"
        raise UsageError(f"{source}: refusing to instantiate {bad} from a checkpoint (allowed {group} targets: "
                         f"{', '.join(sorted(allowed))})")
    return node


def stored_timm_name(meta: dict, source: str) -> str:
    """A checkpoint's backbone name, refused in one line unless it is a plain timm model name this timm lists (an
    architecture, with or without a pretrained tag): a name with a source (``local-dir:``, ``hf-hub:``) or a path
    would make timm read a ``config.json`` of the checkpoint's choosing. The model is rebuilt from the architecture
    and the checkpoint's own weights, nothing else."""
    import reprlib

    import timm

    name = meta.get("timm_name")
    if isinstance(name, str) and name.startswith(("hf-hub:timm/", "hf_hub:timm/")) and timm.is_model(name[12:]):
        name = name[12:]  # timm's own hub repo of a model timm lists: the same architecture, no config read
    if not isinstance(name, str) or not name or any(c in name for c in ":/\\"):
        shown = repr(name) if isinstance(name, str) and len(name) <= 300 else reprlib.repr(name)
        raise UsageError(f"{source}: its stored backbone name {shown} is not a timm model name: a "
                         f"checkpoint's model is rebuilt from an architecture timm lists (timm.list_models()) and "
                         f"its own weights, never from a folder, file or hub repo it names: refusing to build the "
                         f"model; retrain it with a backbone.name timm lists")
    if not timm.is_model(name):
        raise UsageError(f"{source} was trained on timm model {name!r}, which this timm ({timm.__version__}) does not "
                         f"know: install the timm version that trained it")
    return name
