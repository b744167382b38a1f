"""Entry point (also the ``visionft`` console script):

    python -m visionft [hydra overrides]        train (and optionally export=<format>)
    python -m visionft export --ckpt ... --format torchscript|onnx|exported_program
    python -m visionft predict --model ... --inputs ...
    python -m visionft embed --ckpt ... | --backbone ... --inputs ... | --data ... --out features.npz
    python -m visionft report RUN_DIR | MULTIRUN_DIR     (re)build a run's or a sweep's report from its files
    python -m visionft cache [--dir DIR] [--clear [features|images]]   the cache folder: sizes, cap; clear it
"""
from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

# Keep any hub request short; a missing network must not cost a minute of retries.
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")


@hydra.main(config_path="pkg://visionft.conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    from visionft import sweepjobs
    from visionft.callbacks import Interrupted
    from visionft.logs import single_console_handler, to_log_files
    from visionft.train import output_dir, train

    single_console_handler()
    job = output_dir(cfg) if sweepjobs.in_multirun() else None  # before train() sets paths.output_dir to it
    if job is not None:
        sweepjobs.clear(job)
    try:
        metrics = train(cfg)
    except Interrupted as e:  # preemption or Ctrl+C: the checkpoint is saved, the exit code says which signal
        print(f"stopped: {e}", file=sys.stderr)
        to_log_files(f"stopped: {e}")  # the run's log keeps the line (and its resume command)
        sys.exit(e.exit_code)
    except Exception as e:
        said = _one_line(e)
        if said is None:  # a real bug keeps its traceback
            raise
        if job is None:
            print(f"error: {said[0]}", file=sys.stderr)
            to_log_files(f"error: {said[0]}")
            sys.exit(said[1])
        sweepjobs.record(job, said[0])  # this job failed; the sweep goes on with the next one
        return None
    # the sweep objective: the monitored validation metric (never a test metric)
    return metrics["val"].get(cfg.callbacks.monitor)


def _one_line(e: Exception) -> tuple[str, int] | None:
    """A user error's one line and exit code; None for anything else (and, with ``HYDRA_FULL_ERROR=1``, for every
    error but a failed export, whose own traceback is logged here)."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    from visionft.errors import user_errors
    from visionft.outputs import ExportFailed

    if isinstance(e, ExportFailed):  # the run is saved; the exporter's own traceback is logged above the line
        logging.getLogger("visionft").error("export failed", exc_info=e.__cause__)
        return str(e), 1
    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for tracebacks
        return None
    if isinstance(e, MissingMandatoryValue):
        key = getattr(e, "full_key", "") or str(e).split("\n")[0]
        return f"{key} is required and not set: pass {key}=... on the command line", 2
    if isinstance(e, InstantiationException):  # a constructor refused its options: its own message
        cause = e.__cause__
        return (str(cause).strip().splitlines()[-1], 2) if isinstance(cause, user_errors()) else None
    return (str(e), 2) if isinstance(e, user_errors()) else None


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("export", "predict", "embed", "report", "cache"):
        from visionft.cli import run

        sys.exit(run(sys.argv[1], sys.argv[2:]))
    from visionft.preflight import check
    from visionft.resume import with_run_overrides

    sys.argv[1:] = with_run_overrides(sys.argv[1:])  # resume=true paths.output_dir=RUN: that run's own overrides
    problem = check(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    from visionft import apphelp, sweepjobs

    apphelp.register()
    _hydra_main()
    if sweepjobs.failed:  # a multirun in which some jobs failed (each named above)
        sys.exit(1)


if __name__ == "__main__":
    main()
