"""User-facing errors: one line, what was wrong and what to do; the CLI prints it and exits 2."""


class UserError(Exception):
    """A problem with the user's input or environment (not a bug). Message: one line, says what to do."""

    exit_code = 2
