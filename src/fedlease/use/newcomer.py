"""A model for a client that was not in the federation: what its method gives a newcomer, from its own data.

The newcomer's labelled examples never leave it: the run's final server state (its last checkpoint) is what the
server would send a newcomer (``FederatedMethod.configure_newcomers``: FedLEASE's experts, every cluster's router
and head and the clusters' centroids; IFCA's cluster models; FedIT's global adapter; ...), and the newcomer's own
half of the method chooses with its data, here, as an unseen client does at the end of a run (FedLEASE: its data
signature, or with the paper's allocation its B after one local warmup call, picks the nearest cluster; IFCA: the
cluster model with the lowest loss on its data). The result is a :class:`FinalClient` like the run's own.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from fedlease.config import RunConfig
from fedlease.data.tasks import Example, get_spec
from fedlease.errors import ConfigError, DataError
from fedlease.methods import create_method
from fedlease.methods.base import ClientInfo
from fedlease.model.experts import PARTS
from fedlease.runtime.checkpoint import load_checkpoint
from fedlease.runtime.clients import client_infos, load_shared_backbone, register_user_tasks, train_settings
from fedlease.train import LocalClient, encode
from fedlease.use.final import FinalClient, run_history


def newcomer_task(config: RunConfig, task: str | None) -> str:
    tasks = list(dict.fromkeys(config.tasks))
    if task is None:
        if len(tasks) > 1:
            raise ConfigError(f"the run trained several tasks ({' '.join(tasks)}): pass --task for the newcomer's data")
        return tasks[0]
    if task not in tasks:
        raise ConfigError(f"--task {task}: the run trained {' '.join(tasks)}")
    return task


def place_newcomer(run: Path | str, examples: list[Example], task: str | None = None, device: str = "auto"
                   ) -> tuple[FinalClient, dict[str, float]]:
    """The newcomer's model, and its metrics on its own ``examples`` (which chose it, so they are optimistic)."""
    run = Path(run).expanduser()
    history = run_history(run)
    config = replace(RunConfig.from_dict(history["config"]), device=device)
    register_user_tasks(config)
    task = newcomer_task(config, task)
    if not examples:
        raise DataError("--data: the newcomer has no examples")
    spec = get_spec(task)
    if spec.kind != "classification":
        raise ConfigError("a newcomer's model is built for classification runs only (not yet for instruction runs)")
    newcomer = len(config.tasks)  # an id no client of the run has
    infos = [*client_infos(config), ClientInfo(newcomer, task, spec.labels)]
    checkpoint = load_checkpoint(run)
    method = create_method(config, infos)
    method.load_server_state(checkpoint.method_state["method"])
    last = config.global_rounds - 1
    instruction = method.configure_newcomers(last, [newcomer])[newcomer]
    backbone = load_shared_backbone(config)
    encoded = encode(backbone.tokenizer, examples, config.max_length, backbone.pair_encoding == "separate")
    client = LocalClient(newcomer, spec, backbone.adapted, encoded, encoded, train_settings(config, backbone))
    metrics = method.client_evaluate(client, instruction, last, {})
    adapted = backbone.adapted
    targets = sorted({name.rpartition(".")[2] for name in adapted.sites})
    final = FinalClient(run, newcomer, config, task, spec.labels, adapted.layout, targets, backbone.pair_encoding,
                        backbone.num_labels, True, adapted.state(PARTS))
    return final, metrics
