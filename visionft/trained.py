"""The one loader of trained models: ``load_trained`` rebuilds a visionft checkpoint's deployable model (weights-only,
from an architecture timm lists and the checkpoint's own weights, checked arguments), ``load_runner`` opens an
exported artifact (TorchScript, ONNX, ExportedProgram) as a callable, after ``check_archive`` has refused a file that
is not the archive its name says. ``visionft.export`` and ``visionft.predict`` both load through here."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visionft.errors import UsageError


def load_trained(ckpt_path: str | Path) -> tuple[nn.Module, dict, dict]:
    """The deployable model of a visionft checkpoint (the strategy's ``to_deployable``: adapters merged where they
    can be), its metadata and its run config."""
    from hydra.utils import instantiate

    from visionft.backbones import create_backbone
    from visionft.checkpoints import read_checkpoint, stored_node, stored_timm_name

    ckpt = read_checkpoint(ckpt_path, "--ckpt")
    if "visionft" not in ckpt:
        raise UsageError(f"{ckpt_path} is not a visionft checkpoint (no 'visionft' metadata)")
    meta = ckpt["visionft"]
    name = meta["timm_name"] = stored_timm_name(meta, str(ckpt_path))  # before timm sees it: no folder or hub repo
    kwargs = checked_model_kwargs(meta, str(ckpt_path))
    backbone = create_backbone(name, meta["num_classes"], pretrained=False,
                               kwargs={k: v for k, v in kwargs.items() if k != "img_size"},
                               image_size=kwargs.get("img_size"))
    adapted = instantiate(stored_node(ckpt["hyper_parameters"], "strategy", str(ckpt_path))).prepare(backbone.model,
                                                                                                     backbone)
    adapted.model.load_state_dict({k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    return adapted.to_deployable().eval(), meta, ckpt["hyper_parameters"]


def _plain(value) -> bool:
    """None, a bool, number or string, or a list or str-keyed dict of such values."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def _architecture(name: str, source: str) -> type:
    """The class timm builds for ``name``, built on the meta device (no memory, no weights; on the CPU for a
    builder that needs real tensors)."""
    import timm

    try:
        with torch.device("meta"):
            return type(timm.create_model(name, pretrained=False))
    except Exception as e:  # noqa: BLE001
        if "Unknown model" in str(e):
            raise UsageError(f"{source} was trained on timm model {name!r}, which this timm ({timm.__version__}) "
                             f"does not know: install the timm version that trained it") from None
    return type(timm.create_model(name, pretrained=False))


def checked_model_kwargs(meta: dict, source: str) -> dict:
    """A checkpoint's ``model_kwargs``, refused in one line unless every key is one visionft can have written there
    (``backbone.kwargs``, the ``img_size`` of a ViT): an argument of the architecture's own class or one of timm's
    build flags (``scriptable``, ``pretrained_strict``, ...), with a plain value. timm's loading arguments
    (``checkpoint_path``, ``pretrained_cfg_overlay``, ``cache_dir``, ...) are refused as training refuses them, so a
    crafted checkpoint cannot make the model builder open a file."""
    import inspect
    import reprlib

    from visionft.backbones import TIMM_BUILD_FLAGS, refuse_loading_kwargs

    kwargs = meta.get("model_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise UsageError(f"{source}: its model_kwargs are a {type(kwargs).__name__}, not a mapping of timm "
                         f"arguments: refusing to build the model from this checkpoint")
    refuse_loading_kwargs(kwargs, f"{source}: model_kwargs")
    arch = _architecture(meta["timm_name"], source)
    allowed = (set(inspect.signature(arch.__init__).parameters) | TIMM_BUILD_FLAGS) - {"self", "num_classes",
                                                                                        "device", "dtype"}
    bad = [f"{k}={reprlib.repr(v)}" for k, v in kwargs.items() if k not in allowed or not _plain(v)]
    if bad:
        raise UsageError(f"{source}: its model_kwargs hold {', '.join(bad)}, which visionft never writes there "
                         f"(only plain arguments of {arch.__name__} and timm's build flags): refusing to build the "
                         f"model from this checkpoint")
    return kwargs


ACCEPTS = ("--model takes an exported model.pt (TorchScript), model.onnx or model.pt2 (torch.export), a visionft "
           ".ckpt, or a run directory")


def _members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except zipfile.BadZipFile:  # a pickle, a cut file, anything but a zip archive
        return []


def _is_pt2(path: Path) -> bool:
    try:
        from torch.export.pt2_archive import is_pt2_package
    except ImportError:  # torch < 2.7 writes the older zip layout
        return "serialized_exported_program.json" in _members(path)
    return is_pt2_package(str(path))


def check_archive(artifact: Path) -> None:
    """Refuse, before any loader opens it, a ``.pt`` that is not a TorchScript archive or a ``.pt2`` that is not a
    torch.export archive: a pickle or ``torch.save`` file given that name is never unpickled here."""
    if artifact.suffix == ".pt":
        names = _members(artifact)
        ok = any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)
        kind = "a TorchScript archive (torch.jit.save)"
    else:
        ok, kind = _is_pt2(artifact), "a torch.export archive (torch.export.save)"
    if not ok:
        raise UsageError(f"--model {artifact} is not {kind}: it is not loaded (a pickle or torch.save file could run "
                         f"code); {ACCEPTS}")


def load_runner(artifact: str | Path):
    """A callable mapping a normalized float NCHW tensor to logits, for any of the three formats."""
    artifact = Path(artifact)
    if artifact.suffix in (".pt", ".pt2"):
        check_archive(artifact)
    if artifact.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy().astype(np.float32)})[0])
    if artifact.suffix == ".pt2":
        module = torch.export.load(str(artifact)).module()
        return lambda x: module(x).detach()
    if artifact.suffix == ".pt":
        module = torch.jit.load(str(artifact), map_location="cpu").eval()
        return lambda x: module(x).detach()
    raise UsageError(f"unknown artifact {artifact}: expected model.pt (TorchScript), model.onnx or model.pt2")


ARTIFACTS = (".pt", ".onnx", ".pt2")
