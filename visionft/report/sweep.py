"""A sweep's report (a Hydra multirun directory): runs grouped by every swept key except the seed, mean ± std over
seeds with n, failed runs listed with their reason (never dropped), and the metric plotted against the swept keys
and against trainable parameters. The metric compared is the one the runs monitored (``callbacks.monitor`` in each
job's config.yaml, val/acc by default): a sweep selects on validation; the test split's value of the same metric is
reported beside it. Writes ``report.md``, ``report.csv`` (groups), ``runs.csv`` (every job), ``metric.png`` and
``params.png``."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from visionft import sweepjobs
from visionft.atomic import write_text
from visionft.errors import UsageError
from visionft.report import plots
from visionft.report.card import _md, overrides_of
from visionft.report.run import UnreadableMetrics, read_metrics

PER_RUN = ["trainable_params", "total_params", "wall_time_s", "train_images_per_s"]
DEFAULT_MONITOR = "val/acc"  # conf/callbacks/default.yaml


def jobs(root: Path) -> list[Path]:
    """Job directories: those Hydra started (``.hydra/overrides.yaml``), those holding a ``metrics.json``, and
    folders named by a job number (a multirun with ``paths.output_dir=DIR`` writes DIR/<num>, even for a job that
    crashed before its metrics)."""
    found = ({p.parent.parent for p in root.glob("**/.hydra/overrides.yaml")}
             | {p.parent for p in root.glob("*/metrics.json")})
    found |= {p.parent for p in root.glob(f"*/{sweepjobs.ERROR_FILE}")}
    found |= {d for d in root.iterdir() if d.is_dir() and d.name.isdigit()} if found else set()
    return sorted((j for j in found if j != root), key=lambda p: (len(p.name), p.name))


def _metrics(job: Path) -> tuple[dict | None, str]:
    """The job's ``metrics.json`` (None when absent or unreadable) and, when there is none, why."""
    if not (job / "metrics.json").is_file():
        return None, "no metrics.json"
    try:
        return read_metrics(job / "metrics.json"), ""
    except UnreadableMetrics as e:  # e.g. truncated by a kill: this job failed, the others are reported
        return None, f"unreadable metrics.json ({e.reason})"


def monitored(root: Path) -> str:
    """The metric the sweep's runs monitored (``callbacks.monitor`` in their config.yaml); val/acc when no job
    recorded one. Jobs that monitored different metrics cannot be compared on one: refused, naming them."""
    found = set()
    for job in jobs(root):
        try:
            cfg = yaml.safe_load((job / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue
        monitor = ((cfg or {}).get("callbacks") or {}).get("monitor") if isinstance(cfg, dict) else None
        if isinstance(monitor, str):
            found.add(monitor)
    if len(found) > 1:
        raise UsageError(f"the jobs of {root} monitored different metrics ({', '.join(sorted(found))}): pass "
                         f"--metric to compare them on one")
    return found.pop() if found else DEFAULT_MONITOR


def beside(metric: str) -> str | None:
    """The same metric on the other split: test/acc beside val/acc (and val/acc beside test/acc)."""
    split, name = metric.split("/", 1)
    other = {"val": "test", "test": "val"}.get(split)
    return f"{other}/{name}" if other else None


def _value(metrics: dict | None, metric: str | None):
    split = (metrics or {}).get(metric.split("/", 1)[0]) if metric else None
    return split.get(metric) if isinstance(split, dict) else None


def _failure(job: Path, metrics: dict | None, missing: str, metric: str) -> str | None:
    said = sweepjobs.reason(job)  # the job's own one line (a multirun job stopped by a user error)
    if said is not None:
        return said
    if _value(metrics, metric) is not None:
        return None
    why = missing or f"no {metric} in metrics.json"
    log = next(iter(sorted(job.glob("*.log"))), None)
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log else []
    errors = [ln for ln in lines if "error" in ln.lower() or "Traceback" in ln]
    return f"{why}; log: {(errors or lines or ['(empty)'])[-1].strip()[:200]}" if log else why


def collect(root: Path, metric: str) -> pd.DataFrame:
    """One row per job: its overrides (prefixes ``+``/``~`` dropped), the metric and the same metric on the other
    split, cost columns, and why it failed."""
    rows, other = [], beside(metric)
    for job in jobs(root):
        m, missing = _metrics(job)
        params = dict(o.lstrip("+~").split("=", 1) for o in overrides_of(job) or [] if "=" in o)
        failed = _failure(job, m, missing, metric)
        values = {k: None if failed else _value(m, k) for k in (metric, other) if k}
        rows.append({"job": job.relative_to(root).as_posix(), **params, **values,
                     **{k: (m or {}).get(k) for k in PER_RUN}, "failed": failed})
    return pd.DataFrame(rows)


def swept(runs: pd.DataFrame, metric: str) -> list[str]:
    fixed = {"job", metric, beside(metric), "failed", *PER_RUN}
    return [c for c in runs.columns if c not in fixed and runs[c].astype(str).nunique() > 1]


def group(runs: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame:
    """One row per combination of ``keys``, in the sweep's own order (the plot's x order too): n finished runs,
    mean and sample std of the metric over them (and of the same metric on the other split, e.g. ``test/acc mean``),
    failed runs, and the cost columns."""
    ok = runs["failed"].isna()
    other = beside(metric) if beside(metric) in runs else None
    runs = runs.assign(_ok=ok.astype(int), _failed=(~ok).astype(int),
                       _value=pd.to_numeric(runs[metric], errors="coerce").where(ok),
                       _other=pd.to_numeric(runs[other], errors="coerce").where(ok) if other else float("nan"))
    beside_cols = {f"{other} mean": ("_other", "mean"), f"{other} std": ("_other", "std")} if other else {}
    agg = runs.groupby(keys or (lambda _: "all"), sort=False, dropna=False).agg(
        n=("_ok", "sum"), mean=("_value", "mean"), std=("_value", "std"), **beside_cols, failed=("_failed", "sum"),
        trainable_params=("trainable_params", "first"), wall_time_s=("wall_time_s", "mean"),
        train_images_per_s=("train_images_per_s", "mean"))
    return agg.reset_index(drop=not keys)


def write(root: Path, metric: str | None = None, seed_key: str = "seed", out: Path | None = None) -> list[Path]:
    """``metric``: the one to compare the runs on; None: the metric they monitored (``monitored``)."""
    if metric is not None and "/" not in metric:
        raise UsageError(f"--metric {metric} must name a split and a metric, e.g. val/acc or val/f1_macro")
    root = Path(root)
    metric = metric or monitored(root)
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    runs = collect(root, metric)
    keys = [k for k in swept(runs, metric) if k != seed_key]
    groups = group(runs, keys, metric)
    write_text(out / "runs.csv", runs.to_csv(index=False))
    write_text(out / "report.csv", groups.to_csv(index=False))
    written = [out / "runs.csv", out / "report.csv"]
    plotted = groups[groups["n"] > 0]
    figures = []
    if keys and not plotted.empty:
        figures.append(plots.sweep_metric(plotted, keys, metric, out / "metric.png"))
    if not plotted.empty and plotted["trainable_params"].notna().all():
        figures.append(plots.sweep_params(plotted, keys or ["n"], metric, out / "params.png"))
    other = beside(metric) if f"{beside(metric)} mean" in groups else None
    pm = {metric: ("mean", "std"), **({other: (f"{other} mean", f"{other} std")} if other else {})}
    show = groups.assign(**{f"{k} mean ± std": [_pm(m, s) for m, s in zip(groups[a], groups[b])]
                            for k, (a, b) in pm.items()})
    cols = [*keys, *(f"{k} mean ± std" for k in pm), "n", "failed", "trainable_params", "wall_time_s",
            "train_images_per_s"]
    fails = runs[runs["failed"].notna()]
    text = [f"# Sweep report: {root}", "",
            f"{len(runs)} runs, {len(fails)} failed; grouped by {', '.join(keys) or '(nothing swept)'}, "
            f"mean ± std (sample std) over `{seed_key}` and any repeat; compared on `{metric}`"
            + (f", `{other}` beside it" if other else "") + (_ON_TEST if metric.startswith("test/") else ""),
            "", _md(show[cols]), "",
            *(f"![{f.stem}]({f.name})" for f in figures)]
    if len(fails):
        text += ["", "## Failed runs", "", _md(fails[["job", *keys, *([seed_key] if seed_key in fails else []),
                                                      "failed"]])]
    write_text(out / "report.md", "\n".join(text) + "\n")
    return [*written, *figures, out / "report.md"]


_ON_TEST = (" (a test metric: choosing a run on it tunes the choice to the test set; by default a sweep is compared "
            "on the validation metric its runs monitored)")


def _pm(mean, std) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.4f} ± {std:.4f}" if not pd.isna(std) else f"{mean:.4f}"
