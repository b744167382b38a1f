"""The run's model card (``<run>/README.md``): data and splits, backbone and weights, strategy and what trained,
metrics (overall and per class), figures, the exact command that reproduces the run, and the artifacts."""
from __future__ import annotations

import shlex
from pathlib import Path

import pandas as pd
import yaml

from visionft.imbalance import card_line

ARTIFACTS = ["checkpoints/*.ckpt", "export/*/*", "adapter/*", "*.safetensors", "wise/*", "predictions/*",
             "bad_images.csv", "metrics.json", "config.yaml", "overrides.yaml", "csv/metrics.csv"]

RESUME_KEYS = {"resume", "ckpt_path", "resume_changes", "overwrite"}


def _md(df: pd.DataFrame) -> str:
    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.4g}"
        return f"{v:,}" if isinstance(v, int) else str(v).replace("|", "\\|").replace("\n", " ")

    rows = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    rows += ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.astype(object).itertuples(index=False)]
    return "\n".join(rows)


def entered_opens(metrics: dict) -> dict[str, int]:
    """Groups that opened after the start, in an epoch the run reached."""
    return {g: e for g, e in (metrics.get("opens") or {}).items() if e and e < metrics.get("epochs", 0)}


def overrides_of(run: Path) -> list[str] | None:
    """The run's command line: visionft's record (``overrides.yaml``, written as the run starts, and by a resume with
    the values that ran; absent when the Python API was given a composed config), else Hydra's (``.hydra/``)."""
    for path in (run / "overrides.yaml", run / ".hydra" / "overrides.yaml"):
        if path.is_file():
            return list(yaml.safe_load(path.read_text()) or [])
    return None


def command(run: Path, metrics: dict) -> str:
    overrides = overrides_of(run)
    if overrides is None:  # a Python API run from a composed config: its saved config is the exact recipe
        return f"python -m visionft -cp {shlex.quote(str(run.resolve()))} -cn config paths.output_dir=NEW_DIR"
    # a resumed run's command line resumes; the run itself is the command without the resume keys
    run_keys = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in RESUME_KEYS]
    return " ".join(["python -m visionft", *(shlex.quote(o) for o in run_keys)])


def evaluated_on(metrics: dict, split: str, cfg: dict | None = None) -> str:
    """What the split's numbers were computed on: ``"40 of the 200 test images (a partial evaluation:
    trainer.limit_test_batches=0.2); the split: carved from train/: 20%, stratified, seed 0"``."""
    size = (metrics.get("data") or {}).get(split)
    used = (metrics.get(split) or {}).get(f"{split}/images", size)
    origin = (metrics.get("split_origin") or {}).get(split)
    if used is None:
        text = f"the {split} split"
    elif size is not None and used < size:
        limit = ((cfg or {}).get("trainer") or {}).get(f"limit_{split}_batches")
        text = (f"{used:,} of the {size:,} {split} images (a partial evaluation: trainer.limit_{split}_batches"
                f"{f'={limit}' if limit is not None else ''})")
    else:
        text = f"{used:,} {split} images"
    return f"{text}; the split: {origin}" if origin else text


def _headline(cfg: dict, metrics: dict) -> str:
    test, val = metrics.get("test") or {}, metrics.get("val") or {}
    if "test/acc" in test:
        return (f"Test accuracy **{test['test/acc']:.4f}**, macro-F1 {test.get('test/f1_macro', float('nan')):.4f} "
                f"on {evaluated_on(metrics, 'test', cfg)}.")
    if (metrics.get("data") or {}).get("test") == 0 and "val/acc" in val:
        return (f"No separate test set. Validation accuracy **{val['val/acc']:.4f}**, macro-F1 "
                f"{val.get('val/f1_macro', float('nan')):.4f} on {evaluated_on(metrics, 'val', cfg)}. Model selection "
                f"(best checkpoint, probe L2, WiSE-FT alpha) also uses val, so this is not an independent estimate.")
    return "No test metrics on record."


def _data(cfg: dict, metrics: dict) -> list[str]:
    d = cfg.get("data", {})
    sizes, origin = metrics.get("data", {}), metrics.get("split_origin") or {}
    opts = {k: d[k] for k in ("root", "per_class", "val_fraction", "test_fraction", "test_from", "image_size",
                              "augment", "seed") if d.get(k) is not None}
    return [f"- datamodule: `{d.get('_target_', '?')}`", "- splits:",
            *(f"  - {k}: {v:,} images{f' ({origin[k]})' if k in origin else ''}" for k, v in sizes.items()),
            *card_line(metrics),
            *(f"- `data.{k}`: {v}" for k, v in opts.items())]


def shipped(metrics: dict) -> str:
    """The checkpoint the final model comes from, when it was saved, and what was trainable up to then."""
    c, total = metrics["chosen"], metrics.get("total_params", 0)
    wise = (f", then interpolated with the start of fine-tuning at WiSE-FT alpha {c['wise_alpha']:g}, saved as "
            f"`checkpoints/final.ckpt`" if "wise_alpha" in c else "")
    return (f"`{c['checkpoint']}` ({c['selected_by']}{wise}), saved at epoch {c['epoch']}, step {c['step']}; "
            f"trainable up to then: {c['trainable_params']:,} of {total:,} parameters ({c['trainable_pct']:.2f}%): "
            f"{', '.join(c.get('trainable_groups') or []) or 'none'}")


def resumed(r: dict) -> str:
    """Where a resumed run continued from, and what the resume changed (and did not: the checkpoint's state won)."""
    return (f"from `{Path(r['from']).name}` at epoch {r['epoch']}, step {r['step']}; changed on resume: "
            f"{'; '.join(r.get('changes') or []) or 'nothing'}" + (
                f"; not applied (the checkpoint's optimizer state kept its values): {'; '.join(r['not_applied'])}"
                if r.get("not_applied") else ""))


def solved(metrics: dict) -> str | None:
    """How a closed-form probe head was fitted (None when the head trained by gradient)."""
    probe = metrics.get("probe") or {}
    if probe.get("l2") is None:
        return None
    return (f"solved in closed form: L-BFGS logistic regression on cached frozen features, L2 {probe['l2']:g} chosen "
            f"on val; embedding {probe.get('embed_s', 0):.1f} s, solve {probe.get('solve_s', 0):.1f} s")


def _model(cfg: dict, metrics: dict) -> list[str]:
    s = {k: v for k, v in cfg.get("strategy", {}).items() if k != "_target_"}
    trained, total = metrics.get("trainable_params", 0), metrics.get("total_params", 0) or 1
    probe, precision = solved(metrics), metrics.get("precision") or cfg.get("trainer", {}).get("precision")
    fit = probe or (f"{metrics.get('epochs', 0)} epochs, {metrics.get('train_images_per_s', 0):,.0f} train images/s; "
                    f"optimizer `{cfg.get('optimizer', {}).get('_target_', '')}`, schedule "
                    f"`{cfg.get('scheduler', {}).get('_target_', '')}`")
    lines = [f"- backbone: `{metrics.get('backbone')}`, weights: {metrics.get('weights')}",
             f"- strategy: **{metrics.get('strategy')}** (`{cfg.get('strategy', {}).get('_target_', '')}`), options: "
             f"{', '.join(f'{k}={v}' for k, v in s.items())}",
             f"- trained over the run: {trained:,} of {total:,} parameters ({100 * trained / total:.2f}%), {fit}; "
             f"precision {precision}, wall time {metrics.get('wall_time_s', 0):,.0f} s",
             *([f"- final model: {shipped(metrics)}"] if metrics.get("chosen") else []),
             *([f"- resumed: {resumed(metrics['resumed'])}"] if metrics.get("resumed") else [])]
    groups = metrics.get("param_groups")
    if groups:
        cols = ["group", "params", "base_lr", "trainable", "bn"]
        table = pd.DataFrame(groups)[[c for c in cols if c in groups[0]]].astype(object)
        if probe:  # the head is fitted by the solver, not by an optimizer's param group
            head = table["group"] == "head"
            table.loc[head, "trainable"], table.loc[head, "base_lr"] = "solved", "-"
        lines += ["", "Param groups at the end of training (what trained, at which LR, BatchNorm mode):", "",
                  _md(table)]
    opens = entered_opens(metrics)
    if opens:
        lines += ["", "Groups opened after the start: " + ", ".join(f"{g} at epoch {e}" for g, e in opens.items())]
    return lines


def _metrics(cfg: dict, metrics: dict) -> list[str]:
    rows = [{"metric": k.split("/", 1)[-1], "val": metrics.get("val", {}).get(k),  # 'val/acc' or an unprefixed key
             "test": metrics.get("test", {}).get("test/" + k[4:] if k.startswith("val/") else k)}
            for k in metrics.get("val", {}) if not k.endswith("/images")]
    lines = [_md(pd.DataFrame(rows).fillna("-"))] if rows else ["(no evaluation on record)"]
    if rows:
        lines += ["", *(f"- {s}: computed on {evaluated_on(metrics, s, cfg)}" for s in ("val", "test")
                        if metrics.get(s))]
    if rows and metrics.get("chosen"):
        lines.append(f"- model: the final model, {shipped(metrics).split(';')[0]}")
    if "wise" in metrics:
        lines.append(f"\nWiSE-FT: alpha {metrics['wise']['alpha']:g} chosen on val (curve: `wise/alpha_curve.png`)")
    knn = (metrics.get("probe") or {}).get("knn")
    if knn:
        rows = [{"k": k.split("=", 1)[-1], **{s: v.get(s, "-") for s in ("val", "test")}} for k, v in knn.items()]
        lines += ["", "k-NN accuracy on the frozen features (cosine, the training split as the bank):", "",
                  _md(pd.DataFrame(rows))]
    return lines


def model_card(run: Path, metrics: dict, per_class: pd.DataFrame | None, figures: list[Path], notes: dict) -> str:
    cfg_path = run / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    head = f"# {metrics.get('strategy')} on {metrics.get('backbone')}"
    head += "".join(f"\n\n> **WARNING: {w}**" for w in metrics.get("warnings") or [])
    parts = [head, "", _headline(cfg, metrics), "", "## Data", *_data(cfg, metrics), "", "## Model and strategy",
             *_model(cfg, metrics), "", "## Metrics", *_metrics(cfg, metrics)]
    if per_class is not None:
        parts += ["", f"### Per class (test: {evaluated_on(metrics, 'test', cfg).split(';')[0]})", "", _md(per_class)]
    parts += ["", "## Figures", *(f"![{p.stem}]({p.as_posix()})" for p in figures if p.suffix == ".png")]
    parts += [f"- {why}" for why in notes.values()]
    parts += ["", "## Reproduce", "", "```", command(run, metrics), "```", "",
              "Rebuild this report from the run's files: `visionft report " + shlex.quote(str(run)) + "`"]
    found = sorted({p.relative_to(run).as_posix() for pat in ARTIFACTS for p in run.glob(pat) if p.is_file()})
    if metrics.get("export_error"):
        parts += ["", f"Export failed: {metrics['export_error']}"]
    parts += ["", "## Artifacts", *(f"- `{a}`" for a in found),
              *(["- `tb/`: TensorBoard logs (`tensorboard --logdir tb`)"] if (run / "tb").is_dir() else [])]
    return "\n".join(parts) + "\n"
