"""Federated methods, each one module behind the interface in ``base.py``."""

from __future__ import annotations

from collections.abc import Sequence

from fedlease.config import RunConfig
from fedlease.errors import ConfigError
from fedlease.methods.base import ClientInfo, FederatedMethod
from fedlease.methods.feddpa import FedDPA
from fedlease.methods.fedit import FedIT
from fedlease.methods.fedlease import FedLease
from fedlease.methods.fedsa import FedSALoRA
from fedlease.methods.ffa import FFALoRA
from fedlease.methods.ifca import IFCA
from fedlease.methods.local import Local

METHODS: dict[str, type[FederatedMethod]] = {
    cls.name: cls for cls in (FedLease, FedIT, FFALoRA, FedSALoRA, FedDPA, IFCA, Local)
}


def create_method(config: RunConfig, clients: Sequence[ClientInfo]) -> FederatedMethod:
    try:
        cls = METHODS[config.method]
    except KeyError:
        raise ConfigError(f"unknown method {config.method!r}; known methods: {' '.join(METHODS)}") from None
    return cls(config, clients)
