"""``fedlease compare``: several methods on identical partitions and seeds, one table.

A method spec is a method name, optionally with settings that differ for it, e.g. ``fedit:rank=16`` (one
expert at rank 16), ``fedlease:num_experts=16`` (one expert per client) or ``fedlease:top_k=2`` (fixed top-2
routing): the FedLEASE paper's main comparison and its ablations come from one command. Every run gets its
own directory, ``<output_dir>/<spec>/seed_<seed>``, with all the artifacts of ``fedlease run``; the
comparison itself is written to ``comparison.md``, ``comparison.csv`` and ``comparison.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from fedlease.config import RunConfig, expand_tasks, parse_override
from fedlease.errors import ConfigError
from fedlease.report.comparison import MethodResult, write_comparison
from fedlease.runtime.simulation import check_output_dir, prepare_config, run

log = logging.getLogger("fedlease")


@dataclass(frozen=True)
class MethodSpec:
    label: str
    method: str
    overrides: dict

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label)


def parse_spec(text: str) -> MethodSpec:
    name, _, rest = text.partition(":")
    overrides = dict(parse_override(item) for item in rest.split(",") if item.strip()) if rest else {}
    for forbidden in ("method", "seed", "output_dir", "tasks"):
        if forbidden in overrides:
            raise ConfigError(f"method spec {text!r}: {forbidden} is the same for every method of a comparison")
    return MethodSpec(text, name.strip(), overrides)


def plan(base: RunConfig, specs: list[str], seeds: list[int]) -> list[tuple[MethodSpec, int, RunConfig]]:
    """Every (spec, seed) run's configuration, each checked before anything runs."""
    if not specs:
        raise ConfigError("--methods is empty")
    if not seeds:
        raise ConfigError("--seeds is empty")
    parsed = [parse_spec(text) for text in specs]
    labels = [spec.label for spec in parsed]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--methods lists a method twice: {' '.join(labels)}")
    out = Path(base.output_dir)
    runs = []
    for spec in parsed:
        for seed in seeds:
            config = dataclasses.replace(base, method=spec.method, seed=seed,
                                         output_dir=str(out / spec.folder / f"seed_{seed}"), **spec.overrides)
            config = prepare_config(config)
            check_output_dir(config)
            runs.append((spec, seed, config))
    return runs


def compare(base: RunConfig, specs: list[str], seeds: list[int], *, progress: bool = True) -> str:
    """Run every spec with every seed and write the comparison; return the Markdown table."""
    base = dataclasses.replace(base, tasks=expand_tasks(base.tasks))
    runs = plan(base, specs, seeds)
    out = Path(base.output_dir)
    if (out / "comparison.md").exists() and not base.overwrite:
        raise ConfigError(f"--output_dir {out} already holds a comparison; pass --overwrite to replace it")
    results: dict[str, MethodResult] = {}
    for index, (spec, seed, config) in enumerate(runs, start=1):
        log.info("compare: run %d/%d: %s, seed %d", index, len(runs), spec.label, seed)
        start = time.perf_counter()
        result = run(config, progress=progress)
        seconds = time.perf_counter() - start
        history = json.loads((result.output_dir / "training_history.json").read_text())
        results.setdefault(spec.label, MethodResult(spec.label)).add(seed, history, seconds)
    return write_comparison(out, list(results.values()), base)
