"""The error a user can cause: reported as one clear line with exit code 2."""


class UserError(Exception):
    """Something the user can fix (a file, a key, a value): one line, exit code 2."""

    exit_code = 2
