"""``UsageError``: a mistake in what the user asked for (config, command line, inputs, checkpoints given). The CLI
reports it as one line naming the problem and the fix, exit 2; any other exception is a bug and keeps its traceback
(``HYDRA_FULL_ERROR=1`` shows a UsageError's too). A subclass of ValueError, so callers may catch either.

``user_errors()``: every exception type that every entry point (training, ``export``, ``predict``, ``embed``,
``report``) reports that way."""
from __future__ import annotations


class UsageError(ValueError):
    pass


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions reported as one line, exit 2: ``UsageError`` (``WeightsUnavailable`` included), a missing
    file, a loss that is no longer finite (the fix is a setting), a full disk, an unreadable image and an export
    that fails its parity check. Never a library's own ValueError or RuntimeError. Imported here, on first use, so
    that importing this module stays light."""
    from datamodules.images import BadImage
    from visionft.callbacks import NonFiniteLoss
    from visionft.checkpoints import DiskFull
    from visionft.export import ExportCheckFailed

    return (UsageError, FileNotFoundError, NonFiniteLoss, DiskFull, BadImage, ExportCheckFailed)
