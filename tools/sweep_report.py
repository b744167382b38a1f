"""Collect a Hydra multirun directory into a table and a plot.

    python tools/sweep_report.py multirun/2026-11-23/10-00-00 [--metric test/acc] [--out DIR]

Reads every ``<job>/metrics.json`` and the job's overrides (``<job>/.hydra/overrides.yaml``), writes
``report.md``, ``report.csv`` and ``report.png`` (the metric and trainable parameters against the swept value) into
the multirun directory (or ``--out``), and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml


def collect(root: Path, metric: str) -> tuple[list[str], list[dict]]:
    rows, swept = [], []
    for mfile in sorted(root.glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        m = json.loads(mfile.read_text())
        ofile = mfile.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(ofile.read_text()) if ofile.is_file() else []
        params = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
        for k in params:
            if k not in swept:
                swept.append(k)
        split, _, name = metric.partition("/")
        rows.append({"job": mfile.parent.name, **params, metric: m.get(split, {}).get(metric),
                     "trainable_params": m.get("trainable_params"), "total_params": m.get("total_params"),
                     "wall_time_s": m.get("wall_time_s"), "train_images_per_s": m.get("train_images_per_s")})
    varying = [k for k in swept if len({r.get(k) for r in rows}) > 1] or swept
    return varying, rows


def markdown(rows: list[dict], cols: list[str]) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) and v < 1.5 else (f"{v:,}" if isinstance(v, int) else str(v))  # noqa
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], x: str, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [str(r.get(x)) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(xs, [r[metric] for r in rows], "o-", color="tab:blue")
    ax.set_xlabel(x)
    ax.set_ylabel(metric, color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["trainable_params"] for r in rows], "s--", color="tab:orange")
    ax2.set_ylabel("trainable parameters", color="tab:orange")
    ax.set_title(f"{metric} and trainable parameters vs {x}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("multirun_dir", type=Path)
    p.add_argument("--metric", default="test/acc")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    swept, rows = collect(a.multirun_dir, a.metric)
    if not rows:
        raise SystemExit(f"no */metrics.json under {a.multirun_dir}: is it a Hydra multirun directory?")
    out = a.out or a.multirun_dir
    out.mkdir(parents=True, exist_ok=True)
    cols = ["job", *swept, a.metric, "trainable_params", "total_params", "wall_time_s", "train_images_per_s"]
    table = markdown(rows, cols)
    (out / "report.md").write_text(table + "\n")
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, swept[0] if swept else "job", a.metric, out / "report.png")
    print(table)
    return table


if __name__ == "__main__":
    main()
