"""Errors a user can act on, and the exit status the command line gives each.

Everything a user can fix (a parameter, a file, the data, a server) raises a
:class:`UserError`; the command line prints its message on one line and exits with its
``exit_code``. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can act on; exit status 1 (a run-time failure)."""

    exit_code = 1


class InputError(UserError):
    """Bad input: a parameter, a file, the data or a name; exit status 2 (usage)."""

    exit_code = 2


class ServiceFailure(UserError):
    """A service (S3, MLflow) or the machine (disk, permissions) failed; exit status 1."""

    exit_code = 1


__all__ = ["InputError", "ServiceFailure", "UserError"]
