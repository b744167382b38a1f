"""``UsageError``: a mistake in what the user asked for (config, command line, inputs, checkpoints given). The CLI
reports it as one line naming the problem and the fix, exit 2; any other exception is a bug and keeps its traceback
(``HYDRA_FULL_ERROR=1`` shows a UsageError's too). A subclass of ValueError, so callers may catch either."""


class UsageError(ValueError):
    pass
