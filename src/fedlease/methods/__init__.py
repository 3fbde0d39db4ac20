"""Federated methods, each one module behind the interface in ``base.py``."""

from __future__ import annotations

from collections.abc import Sequence

from fedlease.config import RunConfig
from fedlease.errors import ConfigError
from fedlease.methods.base import ClientInfo, FederatedMethod
from fedlease.methods.fedlease import FedLease

METHODS: dict[str, type[FederatedMethod]] = {cls.name: cls for cls in (FedLease,)}


def create_method(config: RunConfig, clients: Sequence[ClientInfo]) -> FederatedMethod:
    try:
        cls = METHODS[config.method]
    except KeyError:
        raise ConfigError(f"unknown method {config.method!r}; known methods: {' '.join(METHODS)}") from None
    return cls(config, clients)
