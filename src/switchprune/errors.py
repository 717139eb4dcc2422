"""Errors a user can act on, and the exit status the command line gives each.

Everything a user can fix (a parameter, a file, the data, a server) raises a
:class:`UserError`; the command line prints its message on one line and exits with its
``exit_code``. Any other exception is a bug and keeps its traceback. A message never shows
credentials: every URI in one goes through :func:`redact_uri`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator


class UserError(Exception):
    """A failure the user can act on; exit status 1 (a run-time failure)."""

    exit_code = 1


class InputError(UserError):
    """Bad input: a parameter, a file, the data or a name; exit status 2 (usage)."""

    exit_code = 2


class ServiceFailure(UserError):
    """A service (S3, MLflow) or the machine (disk, permissions) failed; exit status 1."""

    exit_code = 1


def redact_uri(text: str) -> str:
    """``text`` with the ``user:password@`` part of every URI in it removed.

    Everything up to the last ``@`` of an authority goes, so a password holding ``@`` does not
    leak either. Works on a bare URI and on a whole message (an exception's text) alike.

    Args:
        text: A URI, e.g. ``http://user:secret@host:5000/path``, or text holding URIs.

    Returns:
        The text without credentials, e.g. ``http://host:5000/path``; other text unchanged.
    """
    return _USERINFO.sub("", text)


# From "://" up to the authority's last "@": the authority ends at "/" or white space.
_USERINFO = re.compile(r"(?<=://)[^/\s]*@")


@contextlib.contextmanager
def reraised_as(
    kind: type[UserError], translate: Callable[[Exception], UserError]
) -> Iterator[None]:
    """Let ``kind`` through; turn any other exception inside the block into ``translate(exc)``.

    How a module (the registry, S3) reports whatever its libraries raise as one readable error.
    """
    try:
        yield
    except kind:
        raise
    except Exception as exc:
        raise translate(exc) from exc
