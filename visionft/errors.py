"""``UsageError``: a mistake in what the user asked for (config, command line, inputs, checkpoints given). The CLI
reports it as one line naming the problem and the fix, exit 2; any other exception is a bug and keeps its traceback
(``HYDRA_FULL_ERROR=1`` shows a UsageError's too). A subclass of ValueError, so callers may catch either.

``UserError``: the base class of every error reported that way (``UsageError``, ``WeightsUnavailable``, a loss
that is no longer finite, a full disk, an unreadable image, an export that fails its parity check);
``user_errors()``: what every entry point (training, ``export``, ``predict``, ``embed``, ``report``, ``cache``)
catches. This module imports nothing, so that any layer may raise them."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user fixes (a setting, an input, the disk), reported as one line, exit 2."""


class UsageError(UserError, ValueError):
    pass


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions reported as one line, exit 2: every ``UserError`` and a missing file. Never a library's own
    ValueError or RuntimeError."""
    return (UserError, FileNotFoundError)
