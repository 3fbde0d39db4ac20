"""A model for a client that was not in the federation: what its method gives a newcomer, from its own data.

The newcomer's examples (labelled texts; for an instruction run, instructions with their responses) never leave
it: the run's final server state (its last checkpoint) is what the server would send a newcomer
(``FederatedMethod.configure_newcomers``: FedLEASE's experts, every cluster's router and head and the clusters'
centroids; IFCA's cluster models; FedIT's global adapter; ...), and the newcomer's own half of the method chooses
with its data, here, as an unseen client (``--unseen_clients``) does at the end of a run, on either kind of run
(FedLEASE: its data signature, or with the paper's allocation its B after one local warmup call, picks the nearest
cluster; IFCA: the cluster model with the lowest loss on its data). The result is a :class:`FinalClient` like the
run's own. The newcomer's id is one the run never gave, so where a method seeds a client's choice by its id (the
paper allocation's warmup call, IFCA's draw between tied losses) a held-out client's data may choose otherwise
here than in the run.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from fedlease.config import RunConfig
from fedlease.data.partition import ClientSplit
from fedlease.data.tasks import TaskSpec, get_spec
from fedlease.errors import ConfigError, DataError
from fedlease.methods import create_method
from fedlease.methods.base import ClientInfo
from fedlease.model.experts import PARTS
from fedlease.runtime.checkpoint import load_checkpoint
from fedlease.runtime.clients import (
    client_infos,
    load_shared_backbone,
    local_client,
    register_user_tasks,
    train_settings,
)
from fedlease.use.final import FinalClient, run_history


def run_config(run: Path) -> RunConfig:
    """The finished run's configuration, its own tasks registered."""
    config = RunConfig.from_dict(run_history(run)["config"])
    register_user_tasks(config)
    return config


def newcomer_spec(run: Path | str, task: str | None) -> TaskSpec:
    """The newcomer's task: ``task``, which the run must have trained, or the run's only task."""
    tasks = list(dict.fromkeys(run_config(Path(run).expanduser()).tasks))
    if task is None:
        if len(tasks) > 1:
            raise ConfigError(f"the run trained several tasks ({' '.join(tasks)}): pass --task for the newcomer's data")
        task = tasks[0]
    if task not in tasks:
        raise ConfigError(f"--task {task}: the run trained {' '.join(tasks)}")
    return get_spec(task)


def place_newcomer(run: Path | str, examples: list, task: str | None = None, device: str = "auto"
                   ) -> tuple[FinalClient, dict[str, float]]:
    """The newcomer's model, and its metrics on its own ``examples`` (``Example`` for a classification run,
    ``InstructionExample`` for an instruction run), which chose it, so they are optimistic. The newcomer is
    built as the run builds an unseen client (``local_client``): its examples are its training split, which
    places it, and its test split."""
    run = Path(run).expanduser()
    spec = newcomer_spec(run, task)
    if not examples:
        raise DataError("--data: the newcomer has no examples")
    config = replace(run_config(run), device=device)
    newcomer = len(config.tasks)  # an id no client of the run has
    method = create_method(config, [*client_infos(config), ClientInfo(newcomer, spec.name, spec.labels)])
    method.load_server_state(load_checkpoint(run).method_state["method"])
    last = config.global_rounds - 1
    instruction = method.configure_newcomers(last, [newcomer])[newcomer]
    backbone = load_shared_backbone(config)
    client = local_client(config, backbone, train_settings(config, backbone),
                          ClientSplit(newcomer, spec.name, examples, examples, 0))
    metrics = method.client_evaluate(client, instruction, last, {})
    adapted = backbone.adapted
    targets = sorted({name.rpartition(".")[2] for name in adapted.sites})
    final = FinalClient(run, newcomer, config, spec.name, spec.labels, adapted.layout, targets,
                        backbone.pair_encoding, backbone.num_labels, True, adapted.state(PARTS))
    return final, metrics
