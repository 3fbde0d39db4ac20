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
