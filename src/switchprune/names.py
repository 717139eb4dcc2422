"""Naming rules, one definition each: the parameters, the registry and S3 check names alike.

The patterns use no look-around, so pydantic's field patterns can use them as they are.
"""

from __future__ import annotations

import re

# A model or experiment name: an MLflow registered model and an S3 key prefix alike.
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
# An MLflow alias's shape; MLflow also reserves 'latest' and 'v<number>' (see is_alias).
ALIAS = r"^[A-Za-z][A-Za-z0-9_-]{0,99}$"
# An S3 bucket (3-63 characters; never '..', see is_bucket), and s3://bucket[/prefix].
BUCKET = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
S3_URI = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"
# What a name that breaks a rule is told.
NAME_RULE = "use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
ALIAS_RULE = (
    "use letters, digits, '_' or '-', starting with a letter; 'latest' and 'v<number>' are reserved"
)
_RESERVED_ALIAS = re.compile(r"^(latest|v[0-9]+)$", re.IGNORECASE)


def is_name(text: object) -> bool:
    """Whether ``text`` is a valid model, experiment or file name."""
    return isinstance(text, str) and re.match(NAME, text) is not None


def is_alias(text: object) -> bool:
    """Whether ``text`` is a valid MLflow alias."""
    return (
        isinstance(text, str)
        and re.match(ALIAS, text) is not None
        and not _RESERVED_ALIAS.match(text)
    )


def is_bucket(text: object) -> bool:
    """Whether ``text`` is a valid S3 bucket name."""
    return isinstance(text, str) and re.match(BUCKET, text) is not None and ".." not in text
