"""Flower run-config <-> RunConfig.

Every RunConfig field is a run-config key spelled with dashes (``global_rounds`` -> ``global-rounds``). Flower
run-config values are bool, int, float or str only, so lists are space-separated strings (``tasks =
"sst2:2 qnli:2"``) and an unset optional value is "" (strings) or 0 (numbers). Six keys belong to the Flower
runtime alone: ``round-timeout`` (seconds to wait for the clients' replies in a round), ``wait-nodes-timeout``
(seconds to wait at start for one SuperNode per client), ``resume`` (continue from the checkpoint in
``output-dir``), ``allow-mixed-precision`` (accept nodes that train in different precisions) and
``rejoin-timeout`` (seconds a round waits for a client whose node became unavailable to come back on a new
node, which then gets the round's message again) and ``secure-aggregation`` (Flower's SecAgg+ for the aggregates
that are sums over known groups of clients: docs/deployment.md).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from fedlease.config import RunConfig, compress_tasks, field_type
from fedlease.errors import ConfigError

Scalar = bool | int | float | str

FLOWER_DEFAULTS: dict[str, Scalar] = {"round-timeout": 3600.0, "wait-nodes-timeout": 120.0, "resume": False,
                                       "allow-mixed-precision": False, "rejoin-timeout": 60.0,
                                       "secure-aggregation": False}


def key(name: str) -> str:
    return name.replace("_", "-")


def is_list(name: str) -> bool:
    hint = typing.get_type_hints(RunConfig)[name]
    return typing.get_origin(hint) is list or any(typing.get_origin(a) is list for a in typing.get_args(hint))


def unset(name: str) -> Scalar:
    kind = field_type(name)
    return "" if kind is str else kind(0)


def to_run_config(config: RunConfig) -> dict[str, Scalar]:
    """The run-config table of ``config`` (with the Flower runtime's own keys at their defaults)."""
    values: dict[str, Scalar] = {}
    for field in dataclasses.fields(RunConfig):
        value = getattr(config, field.name)
        if value is None:
            value = unset(field.name)
        elif field.name == "tasks":
            value = compress_tasks(value)
        elif is_list(field.name):
            value = " ".join(map(str, value))
        values[key(field.name)] = value
    return {**values, **FLOWER_DEFAULTS}


def from_run_config(values: Mapping[str, Any]) -> tuple[RunConfig, dict[str, Scalar]]:
    """RunConfig from a Flower run config (missing keys take RunConfig's defaults), and the runtime's keys."""
    fields = {key(f.name): f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - set(fields) - set(FLOWER_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown run-config key(s): {', '.join(unknown)}")
    settings: dict[str, Any] = {}
    for dashed, name in fields.items():
        if dashed not in values:
            continue
        raw, kind = values[dashed], field_type(name)
        if is_list(name):
            settings[name] = str(raw).split() or None
        elif raw in ("", 0) and getattr(RunConfig(), name) is None:
            settings[name] = None
        elif kind is bool:
            settings[name] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
        else:
            try:
                settings[name] = kind(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"run-config {dashed}={raw!r} is not a valid {kind.__name__}") from None
    runtime: dict[str, Scalar] = {}
    for name, default in FLOWER_DEFAULTS.items():
        raw = values.get(name, default)
        runtime[name] = (raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")) \
            if isinstance(default, bool) else type(default)(raw)
    return RunConfig(**settings), runtime
