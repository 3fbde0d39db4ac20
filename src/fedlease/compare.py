"""``fedlease compare``: several methods on identical partitions and seeds, one table.

A method spec is a method name, optionally with settings that differ for it, e.g. ``fedit:rank=16`` (one
expert at rank 16), ``fedlease:num_experts=16`` (one expert per client) or ``fedlease:top_k=2`` (fixed top-2
routing): the FedLEASE paper's main comparison and its ablations come from one command. Every run gets its
own directory, ``<output_dir>/<spec>/seed_<seed>``, with all the artifacts of ``fedlease run``; the
comparison itself is written to ``comparison.md``, ``comparison.csv`` and ``comparison.png``.

A comparison that was stopped (killed, machine lost) continues with ``--resume``: runs that finished are
kept (after checking they were made with the same settings), a run with a checkpoint continues from it, and
a run that stopped before its first round was recorded starts again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from fedlease.config import CONDITIONAL, RunConfig, default_of, expand_tasks, parse_override
from fedlease.errors import ConfigError
from fedlease.report.comparison import MethodResult, write_comparison
from fedlease.runtime.checkpoint import FOLDER as CHECKPOINT_FOLDER
from fedlease.runtime.checkpoint import MANIFEST
from fedlease.runtime.clients import resolve_defaults
from fedlease.runtime.simulation import check_output_dir, config_changes, prepare_config, resume_config, run

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


def plan(base: RunConfig, specs: list[str], seeds: list[int],
         resume: bool = False) -> list[tuple[MethodSpec, int, RunConfig]]:
    """Every (spec, seed) run's configuration, each checked before anything runs."""
    if not specs:
        raise ConfigError("--methods is empty")
    if not seeds:
        raise ConfigError("--seeds is empty")
    if len(set(seeds)) != len(seeds):  # a repeated seed would be one run counted twice, a false spread
        raise ConfigError(f"--seeds lists a seed twice: {' '.join(map(str, seeds))}")
    parsed = [parse_spec(text) for text in specs]
    folders: dict[str, str] = {}
    for spec in parsed:  # "fedit:rank=16,lr=0.001" and "fedit:rank=16, lr=0.001" are one method in one folder
        if spec.folder in folders:
            raise ConfigError(f"--methods lists a method twice: {folders[spec.folder]!r} and {spec.label!r} "
                              f"(both would run in {spec.folder}/)")
        folders[spec.folder] = spec.label
    out = Path(base.output_dir)
    used: set[str] = set()  # the method-specific settings that some run of the comparison uses
    not_used: dict[str, str] = {}  # the others: why not
    runs = []
    for spec in parsed:
        for seed in seeds:
            config = dataclasses.replace(base, method=spec.method, seed=seed,
                                         output_dir=str(out / spec.folder / f"seed_{seed}"), **spec.overrides)
            unused = {name: why for name in CONDITIONAL if (why := config.unused(name))}
            for name in spec.overrides:
                if name in unused:
                    raise ConfigError(f"method spec {spec.label!r}: {name} does not apply to {spec.method}: "
                                      f"{unused[name]}")
            used |= set(CONDITIONAL) - set(unused)
            not_used = {**unused, **not_used}  # the first reason given for each
            # a comparison's flag is for the methods that use it: the others run (and record) their default
            config = dataclasses.replace(config, **{name: default_of(name) for name in unused})
            config = prepare_config(config)
            if not resume:
                check_output_dir(config)
            runs.append((spec, seed, config))
    for name in CONDITIONAL:
        if getattr(base, name) != default_of(name) and name not in used:
            raise ConfigError(f"--{name} {getattr(base, name)} does not apply to any method compared: "
                              f"{not_used[name]}")
    return runs


def compare(base: RunConfig, specs: list[str], seeds: list[int], *, progress: bool = True,
            resume: bool = False) -> str:
    """Run every spec with every seed and write the comparison; return the Markdown table. With
    ``resume``, continue a comparison in ``base.output_dir`` that was stopped."""
    base = dataclasses.replace(base, tasks=expand_tasks(base.tasks))
    out = Path(base.output_dir)
    if resume and base.overwrite:
        raise ConfigError("--resume continues a comparison and --overwrite replaces it: pass one of them")
    if resume and not out.is_dir():
        raise ConfigError(f"--resume: {out} holds no comparison to continue")
    runs = plan(base, specs, seeds, resume)
    if (out / "comparison.md").exists() and not (base.overwrite or resume):
        raise ConfigError(f"--output_dir {out} already holds a comparison; pass --overwrite to replace it")
    # with --resume, every earlier run is checked against the flags before anything runs
    earlier = [resume_state(config) if resume else (None, None) for _, _, config in runs]
    results: dict[str, MethodResult] = {}
    for index, ((spec, seed, config), (history, resumed)) in enumerate(zip(runs, earlier, strict=True), start=1):
        log.info("compare: run %d/%d: %s, seed %d", index, len(runs), spec.label, seed)
        if history is not None:
            log.info("compare: %s already finished; keeping it", config.output_dir)
        else:
            if resumed is not None:
                result = run(resumed, progress=progress, resume=True)
            else:  # new, or stopped before its first round was recorded: start it (again)
                result = run(dataclasses.replace(config, overwrite=config.overwrite or resume), progress=progress)
            history = json.loads((result.output_dir / "training_history.json").read_text())
        # the rounds' wall time: comparable whether a run went through at once or was resumed
        seconds = sum(r["seconds"] for r in history["rounds"])
        results.setdefault(spec.label, MethodResult(spec.label)).add(seed, history, seconds)
    return write_comparison(out, list(results.values()), resolve_defaults(base))  # name the model and rank used


def resume_state(config: RunConfig) -> tuple[dict | None, RunConfig | None]:
    """What an earlier attempt left in ``config.output_dir``: (the history of a finished run, None),
    (None, the configuration to resume a run with a checkpoint) or (None, None): start afresh. A run made
    with other settings is refused, naming them."""
    history = finished_history(config)
    if history is not None:
        return history, None
    if (Path(config.output_dir) / CHECKPOINT_FOLDER / MANIFEST).exists():
        return None, resume_config(config.output_dir, config.to_dict())
    return None, None


def finished_history(config: RunConfig) -> dict | None:
    """The history of a finished run in ``config.output_dir``, or None; a finished run made with other
    settings is refused, naming them."""
    path = Path(config.output_dir) / "training_history.json"
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # json.JSONDecodeError: killed while writing; its checkpoint has the rounds
    if not history.get("final"):
        return None
    changes = config_changes(RunConfig.from_dict(history["config"]), config.to_dict())
    if changes:
        raise ConfigError(f"cannot resume: {path.parent} was run with other settings: {', '.join(changes)}")
    return history
