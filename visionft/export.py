"""Export a trained checkpoint for deployment: TorchScript, ONNX or a torch.export ExportedProgram of the strategy's
deployable model (adapters merged where they can be, so the artifact needs no adapter library nor visionft; prompt
tokens stay inside), plus ``config.json`` (timm's format: the preprocessing evaluation used, label names) and, for a
plain timm model, ``model.safetensors`` loadable with ``timm.create_model('local-dir:DIR', pretrained=True)``. Every
export checks itself against the eager model before it reports success."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from visionft.atomic import write_text
from visionft.errors import UsageError, UserError
from visionft.trained import load_trained

log = logging.getLogger(__name__)
FORMATS = {"torchscript": "model.pt", "onnx": "model.onnx", "exported_program": "model.pt2"}
# max |logit difference| allowed, fp32: ATOL + RTOL x max |logit| (the logits' scale: exporters reorder float ops,
# so their error grows with the logits; ONNX on real photos differed by 1.5e-4 with identical top-1)
ATOL, RTOL = 1e-4, 1e-4


class ExportCheckFailed(UserError, RuntimeError):
    pass


def held_out_batch(hparams: dict, meta: dict, n: int = 256) -> tuple[torch.Tensor, str]:
    """Up to ``n`` normalized test images of the run's dataset, or synthetic inputs when the data is not here."""
    from hydra.utils import instantiate

    from datamodules.transforms import normalize_uint8
    from visionft.checkpoints import stored_node

    try:
        dm = instantiate(stored_node(hparams, "data", "the checkpoint"))
        dm.configure(meta["image_size"], meta["interpolation"], meta["crop_pct"])
        ds = dm.dataset("test")
        images = torch.stack([ds[i][0] for i in range(min(n, len(ds)))])
        return normalize_uint8(images, meta["mean"], meta["std"]), f"{len(images)} held-out test images"
    except Exception as e:  # noqa: BLE001 - any failure to reach the data means synthetic inputs
        log.warning("held-out images unavailable (%s); checking the export on synthetic inputs", e)
        g = torch.Generator().manual_seed(0)
        s = meta["image_size"]
        return torch.randn(min(n, 16), 3, s, s, generator=g), "synthetic inputs (held-out images unavailable)"


def _torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():  # TorchScript is deprecated upstream; silence that here only
        warnings.simplefilter("ignore")
        try:
            scripted = torch.jit.script(model)
        except Exception as e:  # noqa: BLE001 - not every timm model scripts; tracing is exact for these nets
            log.info("torch.jit.script failed (%s); tracing instead", str(e).splitlines()[0][:120])
            scripted = torch.jit.trace(model, example, check_trace=False)
        scripted.save(str(path))


def _exported_program(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(ep, str(path))


def _onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["x"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}}, dynamo=True,
                          verbose=False)


EXPORTERS = {"torchscript": _torchscript, "onnx": _onnx, "exported_program": _exported_program}


def check_parity(model: nn.Module, runner, inputs: torch.Tensor, source: str, atol: float = ATOL,
                 rtol: float = RTOL) -> dict:
    """Batch 1 and batch N: max |logit| difference <= atol + rtol x max |logit|, and the same top-1 wherever the
    eager top-2 margin exceeds that tolerance (near-ties on barely trained models are not failures). Raises
    ExportCheckFailed."""
    report = {"inputs": source}
    for label, x in (("batch_1", inputs[:1]), (f"batch_{len(inputs)}", inputs)):
        with torch.no_grad():
            ref = model(x)
        got = torch.as_tensor(runner(x))
        diff = (ref - got).abs().max().item()
        tol = atol + rtol * ref.abs().max().item()
        top2 = ref.topk(min(2, ref.shape[1]), dim=1).values
        clear = (top2[:, 0] - top2[:, -1]) > tol
        agree = (ref.argmax(1) == got.argmax(1))[clear].float().mean().item() if clear.any() else 1.0
        report[label] = {"max_abs_diff": diff, "tolerance": tol, "top1_agreement": agree, "checked": int(clear.sum())}
        if diff > tol or agree < 1.0:
            raise ExportCheckFailed(f"export check failed on {label} ({source}): max |diff| {diff:.2e} "
                                    f"(tolerance {tol:.2e}), top-1 agreement {agree:.4f}")
    return report


def export(ckpt_path: str | Path, fmt: str, out_dir: str | Path | None = None) -> tuple[Path, dict]:
    """Write ``fmt``'s artifact, ``config.json`` and ``model.safetensors`` into ``out_dir``; return the artifact path
    and the parity report. Nothing is reported as exported unless the check passed."""
    import json

    import timm

    from visionft.trained import load_runner

    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    model, meta, hparams = load_trained(ckpt_path)
    out = Path(out_dir) if out_dir else Path(ckpt_path).resolve().parent.parent / "export" / fmt
    out.mkdir(parents=True, exist_ok=True)
    inputs, source = held_out_batch(hparams, meta)
    artifact = out / FORMATS[fmt]
    EXPORTERS[fmt](model, inputs[:2], artifact)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, meta["image_size"], meta["image_size"]),
                            "interpolation": meta["interpolation"], "mean": tuple(meta["mean"]),
                            "std": tuple(meta["std"]), "crop_pct": meta["crop_pct"], "num_classes": meta["num_classes"]}
    hf = {"model_config": {"label_names": meta["classes"]}, "model_args": meta["model_kwargs"] or None}
    if type(model).__module__.startswith("timm."):  # a plain timm model: weights + config, loadable by timm
        timm.models.save_for_hf(model, str(out), safe_serialization=True, **hf)
    else:  # a wrapped model (e.g. prompt tokens): the artifact carries the weights; config.json the preprocessing
        from timm.models._hub import save_config_for_hf

        save_config_for_hf(model, out / "config.json", **hf)
    report = check_parity(model, load_runner(artifact), inputs, source)
    write_text(out / "export_check.json", json.dumps(report, indent=2))
    return artifact, report
