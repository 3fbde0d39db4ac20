"""Errors a user can act on.

Anything raised as :class:`FedleaseError` reaches the user as one line, ``fedlease: error: <message>``, and
exit status 2, with no traceback: the message must say what is wrong and what to do instead.
"""

from __future__ import annotations


class FedleaseError(Exception):
    """A problem with the user's input or environment, reported as one line."""


class ConfigError(FedleaseError):
    """A flag or a combination of flags that cannot work."""


class DataError(FedleaseError):
    """Missing, malformed or insufficient data."""


class ModelError(FedleaseError):
    """A model that cannot be found or loaded."""


def first_line(exc: BaseException) -> str:
    """An exception's first line of text, for a one-line message; its type's name where it has no text."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe(exc: BaseException) -> str:
    """An exception as a remote party reports it: its type and its message."""
    return f"{type(exc).__name__}: {exc}"
