"""Errors shared by every layer. `ConfigError` lives here, at the bottom of the import graph, so that both
`config` (which validates) and `losses` (whose registry rejects an unknown `loss.name`) can raise it.

The user-error types: problems with what a user gave (a file, a folder, a row, an option), not bugs.
`egrsd` (cli.py) prints ConfigError and every UserError as one line and exits 2; any other exception is a
bug and shows its full traceback. Each also subclasses the builtin it refines (ValueError,
FileNotFoundError, FileExistsError), so code that catches the builtin keeps working.
"""


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and file) and what to do."""


class UserError(Exception):
    """A problem with the user's input; the message names the file/row/key and what to do."""


class InputError(UserError, ValueError):
    """A file, row or option value the user gave is malformed or inconsistent."""


class MissingInputError(UserError, FileNotFoundError):
    """A file, folder or package the user's command needs is not there."""


class OutputExistsError(UserError, FileExistsError):
    """An output folder the user named already holds something (nothing was written)."""
