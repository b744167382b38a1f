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
    from visionft.callbacks import Interrupted
    from visionft.errors import user_errors
    from visionft.logs import single_console_handler, to_log_files
    from visionft.train import ExportFailed, train

    single_console_handler()
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    full = os.environ.get("HYDRA_FULL_ERROR") == "1"  # the user asked for tracebacks: re-raise everything
    try:
        metrics = train(cfg)
    except MissingMandatoryValue as e:
        if full:
            raise
        key = getattr(e, "full_key", "") or str(e).split("\n")[0]
        print(f"error: {key} is required and not set: pass {key}=... on the command line", file=sys.stderr)
        sys.exit(2)
    except InstantiationException as e:  # a constructor refused its options: show its own message
        cause = e.__cause__
        if full or not isinstance(cause, user_errors()):  # a real bug keeps its traceback
            raise
        print(f"error: {str(cause).strip().splitlines()[-1]}", file=sys.stderr)
        to_log_files(f"error: {str(cause).strip().splitlines()[-1]}")
        sys.exit(2)
    except Interrupted as e:  # preemption or Ctrl+C: the checkpoint is saved, the exit code says which signal
        print(f"stopped: {e}", file=sys.stderr)
        to_log_files(f"stopped: {e}")  # the run's log keeps the line (and its resume command)
        sys.exit(e.exit_code)
    except user_errors() as e:
        if full:
            raise
        print(f"error: {e}", file=sys.stderr)
        to_log_files(f"error: {e}")
        sys.exit(2)
    except ExportFailed as e:  # the run is saved; the exporter's own traceback is logged above this line
        logging.getLogger("visionft").error("export failed", exc_info=e.__cause__)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    # the sweep objective: the monitored validation metric (never a test metric)
    return metrics["val"].get(cfg.callbacks.monitor)


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
    _hydra_main()


if __name__ == "__main__":
    main()
