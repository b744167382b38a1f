"""A quiet console: one copy of each log line, and none of the third-party noise that says nothing about the run
(Lightning's cloud-logging tips, a deprecation inside Lightning's pytree helper, the log-interval warning on small
data, ONNX's initializer notices)."""
from __future__ import annotations

import logging
import os
import warnings

NOISE = ("💡 Tip", "Loading `train_dataloader` to estimate")
WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated", r"The number of training batches \(\d+\) is smaller",
            r".*does not have many workers")
# expected when resuming (the csv logger appends, checkpoints continue); a fresh run into a used folder keeps them
RESUME_WARNINGS = (r"Experiment logs directory .* exists and is not empty",
                   r"Checkpoint directory .* exists and is not empty")


def printable(text) -> str:
    """``text`` (e.g. a path) with the bytes of a file name that are not UTF-8 (Python's surrogate escapes,
    ``caf\\udce9.png``) written as ``\\xe9``: ``caf\\xe9.png``, safe to print, log and write as UTF-8."""
    text = str(text)
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name gives
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _Printable(logging.Filter):
    """A line naming a file whose name is not UTF-8 is written with ``printable`` (a strict UTF-8 log file or
    console would otherwise fail to write it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if (shown := printable(message)) != message:
            record.msg, record.args = shown, None
        return True


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISE)


def quiet_third_party(resuming: bool = False) -> None:
    """Idempotent; called at the start of every run (and of every command, once logging is configured)."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropNoise) for f in rank_zero.filters):
        rank_zero.addFilter(_DropNoise())
    for pattern in WARNINGS + (RESUME_WARNINGS if resuming else ()):
        warnings.filterwarnings("ignore", message=pattern)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _Printable) for f in handler.filters):
            handler.addFilter(_Printable())
    for name in ("onnxscript", "onnx_ir"):  # "Replaced initializer ...", "Removed 137 unused nodes" per pass
        logging.getLogger(name).setLevel(logging.WARNING)


def single_console_handler() -> None:
    """Lightning adds its own console handler (on the ``lightning`` logger and its ``pytorch``/``fabric`` children)
    when imported before logging is configured; under Hydra, which configures the root logger, that printed every
    line twice. Call once the root logger has a handler."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(h)
        logger.propagate = True


def to_log_files(line: str) -> None:
    """Write ``line`` to the log files of the root logger (the run's log under Hydra: ``<run>/<job name>.log``)
    and not to the console, where the caller prints it itself: an error that stops a run is on record in the run."""
    record = logging.LogRecord("visionft", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
