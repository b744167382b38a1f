"""``visionft export``, ``predict``, ``embed`` and ``report``: plain argparse, so that any path works (Hydra's override
grammar rejects spaces, parentheses, commas, '=' and non-ASCII characters in values)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from visionft.cache_cli import cache_main
from visionft.errors import UsageError, user_errors
from visionft.export import FORMATS


def export_main(argv: list[str]) -> int:
    from visionft.export import export

    p = argparse.ArgumentParser(prog="visionft export", description="Export a trained checkpoint, with parity checks.")
    p.add_argument("--ckpt", required=True, help="a visionft Lightning .ckpt (e.g. <run>/checkpoints/best.ckpt)")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--out", default=None, help="output folder (default: <run>/export/<format>)")
    a = p.parse_args(argv)
    artifact, report = export(a.ckpt, a.format, a.out)
    print(f"exported {artifact}\nparity ({report['inputs']}): "
          f"{json.dumps({k: v for k, v in report.items() if k != 'inputs'})}")
    return 0


def predict_main(argv: list[str]) -> int:
    from visionft.logs import printable
    from visionft.predict import accuracy, predict

    p = argparse.ArgumentParser(prog="visionft predict", description="Top-k predictions of a trained model; on a "
                                "labelled folder (<folder>/<class>/... with the model's class names) also accuracy.")
    p.add_argument("--model", required=True, help="an exported model.pt (TorchScript), model.onnx or model.pt2, a "
                   "visionft .ckpt (e.g. <run>/checkpoints/best.ckpt), or a run directory (its final model)")
    p.add_argument("--inputs", required=True, nargs="+", help="image files and/or folders")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--out", default=None, help="write predictions as CSV here (true_label: a labelled folder's)")
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args(argv)
    for flag, value in (("--topk", a.topk), ("--batch-size", a.batch_size)):
        if value < 1:
            raise UsageError(f"{flag} {value} must be an integer >= 1")
    rows, failed = predict(a.model, a.inputs, a.topk, a.out, a.batch_size)
    for r in rows if not a.out else []:
        print(printable(r["path"]), r["label_1"], r["prob_1"])
    print(f"{len(rows)} images predicted" + (f", written to {a.out}" if a.out else ""))
    scored = accuracy(rows)
    if scored is not None:
        print(f"accuracy {scored[0]:.4f} (top-1, {scored[1]} images labelled by their class folder"
              + (f"; {len(failed)} unreadable not counted" if failed else "") + ")")
    for path, why in failed:
        print(f"unreadable: {printable(path)}: {printable(why)}", file=sys.stderr)
    if not rows:
        raise UsageError(f"no readable image under {' '.join(a.inputs)}: pass image files or folders holding them")
    return 0


def embed_main(argv: list[str]) -> int:
    from visionft.embed import embed_command

    p = argparse.ArgumentParser(prog="visionft embed", description="Pre-logit features of a backbone or trained "
                                "checkpoint for a folder or a dataset split, as .npz or .parquet.")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="a trained visionft .ckpt (its deployable model and evaluation geometry)")
    model.add_argument("--backbone", help="a backbone preset (conf/backbone) or any timm name, pretrained weights")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--inputs", nargs="+", help="image files and/or folders (<folder>/<class>/... gives labels)")
    source.add_argument("--data", help="a dataset preset (conf/data), e.g. digits, or `run`: the --ckpt run's own "
                        "data and splits; data.* overrides may follow")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="the split of --data")
    p.add_argument("--out", required=True, help="features.npz (features, labels, paths, classes) or .parquet")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for --data, e.g. data.root=/path")
    a = p.parse_args(argv)
    done = embed_command(a.out, a.inputs, a.data, a.split, a.ckpt, a.backbone, a.batch_size, a.overrides, a.device)
    print(f"{done['images']} images embedded ({done['dim']} features each), written to {done['out']}")
    for path, why in done["failed"]:
        print(f"unreadable: {path}: {why}", file=sys.stderr)
    return 0


def report_main(argv: list[str]) -> int:
    from visionft.report import build

    p = argparse.ArgumentParser(prog="visionft report", description="(Re)build the report of a run directory "
                                "(README.md model card, report/) or of a sweep (multirun) directory (report.md, "
                                "report.csv, runs.csv, plots), from the files alone.")
    p.add_argument("path", help="a run directory (has metrics.json) or a multirun directory")
    p.add_argument("--metric", default=None, help="sweeps: the metric to compare the runs on (default: the one "
                   "they monitored, callbacks.monitor, e.g. val/acc; the test split's value is shown beside it)")
    p.add_argument("--seed-key", default="seed", help="sweeps: the swept key averaged over (default seed)")
    a = p.parse_args(argv)
    written = build(a.path, a.metric, a.seed_key)
    print("\n".join(str(w) for w in written))
    if (md := next((w for w in written if w.name == "report.md"), None)) is not None:
        print(md.read_text())
    return 0


COMMANDS = {"export": export_main, "predict": predict_main, "embed": embed_main, "report": report_main,
            "cache": cache_main}


def run(command: str, argv: list[str]) -> int:
    from visionft.logs import quiet_third_party

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_third_party()
    try:
        return COMMANDS[command](argv)
    except user_errors() as e:  # the training entry point's set: one line, exit 2
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
