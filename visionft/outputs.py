"""What a run leaves in its output directory: ``metrics.json`` and ``config.yaml`` (rewritten as phases finish),
``bad_images.csv``, the report, the export, and the summary line. Every file is written atomically
(``visionft.atomic``): a kill or a full disk leaves the previous file, and a failed write is one line."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from visionft.atomic import write_text
from visionft.logs import printable

log = logging.getLogger("visionft.train")


def write_rejected(rejected: dict[str, str], out: Path) -> Path | None:
    """``bad_images.csv``: every image file the run could not use, with the reason (none: no file, not a stale one)."""
    if not rejected:
        (out / "bad_images.csv").unlink(missing_ok=True)
        return None
    import csv
    import io

    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["path", "reason"])
    w.writerows((printable(p), printable(why)) for p, why in sorted(rejected.items()))
    return write_text(out / "bad_images.csv", text.getvalue())


class ExportFailed(RuntimeError):
    pass


def export_final(ckpt: str, fmt: str, out: Path, metrics: dict, cfg: DictConfig) -> Path:
    from visionft.export import export

    try:
        artifact, report = export(ckpt, fmt, out / "export" / fmt)
    except Exception as e:
        metrics["export_error"] = f"{type(e).__name__}: {e}"
        write_outputs(metrics, cfg, out)
        raise ExportFailed(f"export={fmt} failed after training ({type(e).__name__}: {str(e).splitlines()[0]}); "
                           f"the run is saved (metrics.json, config.yaml, checkpoints in {out}): retry with "
                           f"`visionft export --ckpt {ckpt} --format {fmt}`") from e
    worst = max(v["max_abs_diff"] for v in report.values() if isinstance(v, dict))
    log.info("exported %s: parity on %s, max |logit diff| %.2e", artifact, report["inputs"], worst)
    return artifact


def write_metrics(metrics: dict, out: Path) -> None:
    write_text(out / "metrics.json", json.dumps(metrics, indent=2))


def write_outputs(metrics: dict, cfg: DictConfig, out: Path) -> None:
    write_metrics(metrics, out)
    write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def summary(m: dict, out: Path) -> str:
    """The closing lines: the final numbers and what they were computed on (val when there is no test split)."""
    from visionft.report.card import evaluated_on, solved

    fit = solved(m) or f"{m['train_images_per_s']:.0f} train img/s"
    split = "val" if not m["test"] and (m.get("data") or {}).get("test") == 0 else "test"
    t, alone = m[split], " (no separate test set: data.test_fraction=0)" if split == "val" else ""
    return (f"\n{m['strategy']} on {m['backbone']} ({m['weights']}): {split} acc "
            f"{t.get(f'{split}/acc', float('nan')):.4f}, macro-F1 {t.get(f'{split}/f1_macro', float('nan')):.4f}"
            f"{alone}\non {evaluated_on(m, split)}\ntrained over the run: {m['trainable_params']:,} of "
            f"{m['total_params']:,} params; {fit}; {m['wall_time_s']:.0f} s\n"
            f"{final_model_lines(m)}outputs: {out}\n")


def final_model_lines(m: dict) -> str:
    """The final model's checkpoint (epoch, step, trainable then) and any warning, one line each."""
    from visionft.report.card import shipped

    return "".join([f"final model: {shipped(m)}\n"] if m.get("chosen") else []) + "".join(
        f"WARNING: {w}\n" for w in m.get("warnings") or [])


def write_overrides(overrides: list[str] | None, out: Path) -> None:
    """``overrides.yaml``: the run's command line (what Hydra keeps in ``.hydra/``, for API runs too)."""
    if overrides is not None:
        import yaml

        write_text(out / "overrides.yaml", yaml.safe_dump(list(overrides), default_flow_style=False))


def task_overrides() -> list[str] | None:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def clear_report(out: Path) -> None:
    import shutil

    from visionft.report.predictions import FILE

    (out / FILE).unlink(missing_ok=True)
    shutil.rmtree(out / "report", ignore_errors=True)


def write_report(metrics: dict, out: Path, keep_predictions=None) -> None:
    """Save the test predictions (``keep_predictions()``), then the run's report from its files. A failure in either
    is logged with its traceback and recorded in ``metrics.json`` (``report_error``); the report is still drawn
    without the predictions, and neither ever costs the trained run or its export."""
    from visionft.report import run as run_report

    metrics.pop("report_error", None)
    write_metrics(metrics, out)  # the report reads the run's files
    for step, what in ((keep_predictions, "test predictions"), (lambda: run_report.write(out), "report")):
        if step is None:
            continue
        try:
            step()
        except Exception as e:  # noqa: BLE001 - the run is saved; `visionft report` rebuilds the report
            log.exception("the run's %s could not be written (the run is saved; `visionft report %s` rebuilds the "
                          "report)", what, out)
            metrics["report_error"] = f"{what}: {type(e).__name__}: {e}"
    write_metrics(metrics, out)
