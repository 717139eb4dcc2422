"""Errors a user can act on, and the exit status the command line gives each.

Everything a user can fix (a parameter, a file, the data, a server) raises a
:class:`UserError`; the command line prints its message on one line and exits with its
``exit_code``. Any other exception is a bug and keeps its traceback. A message never shows
credentials: every URI in one goes through :func:`redact_uri`.
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


def redact_uri(uri: str) -> str:
    """``uri`` without any ``user:password@`` part, for messages and reports.

    Everything up to the last ``@`` of the authority goes, so a password holding ``@`` does
    not leak either.

    Args:
        uri: A URI, e.g. ``http://user:secret@host:5000/path``.

    Returns:
        The URI without credentials, e.g. ``http://host:5000/path``; other text unchanged.
    """
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        host, sep, path = rest.partition("/")
        if "@" in host:
            return f"{scheme}://{host.rsplit('@', 1)[1]}{sep}{path}"
    return uri


__all__ = ["InputError", "ServiceFailure", "UserError", "redact_uri"]
