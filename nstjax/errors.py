"""The errors a run reports as one clear line: what the user can fix (exit code 2) and a file
that could not be written (exit code 74)."""


class UserError(Exception):
    """Something the user can fix (a file, a key, a value): one line, exit code 2."""

    exit_code = 2


class WriteError(OSError):
    """A file nstjax writes could not be written (disk full, I/O error): one line, exit code 74
    (EX_IOERR in sysexits.h). The file keeps its previous content, if it had one."""

    exit_code = 74
