"""The Flower ClientApp: one client (one partition) per SuperNode, running the method's client half.

A SuperNode is told which client it is by its node config: ``partition-id`` (set by Flower in simulation;
``flower-supernode --node-config "partition-id=3"`` in deployment) and, optionally, ``data-dir``, a local GLUE
folder that replaces the run's ``data-dir`` on that node. The node loads only its own task's data and draws
its own slice, exactly the slice the in-process runner gives that client. The client's own store (state that
never leaves it, such as FedSA's B) lives in the node's ``context.state``.

Flower (1.42) starts a fresh ClientApp process for every message in deployment, so the backbone is loaded for
every message there; in simulation the process, and the cached session below, live for the whole run.
"""

from __future__ import annotations

import dataclasses
import functools
import json

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlease.errors import ConfigError
from fedlease.methods import create_method
from fedlease.methods.base import FederatedMethod
from fedlease.model.experts import PARTS
from fedlease.runtime.clients import client_infos, load_partition, load_shared_backbone, local_client, train_settings
from fedlease.runtime.flower.messages import decode_instruction, encode_evaluation, encode_update, tensors
from fedlease.runtime.flower.run_config import from_run_config
from fedlease.runtime.loop import Evaluation
from fedlease.runtime.simulation import prepare_config
from fedlease.train import LocalClient

app = ClientApp()

STORE = "fedlease-store"


@dataclasses.dataclass
class Session:
    partition_id: int
    method: FederatedMethod
    client: LocalClient


def partition_id_of(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ConfigError("this SuperNode has no partition-id in its node config "
                          "(flower-supernode --node-config \"partition-id=N\")")
    return int(context.node_config["partition-id"])


@functools.lru_cache(maxsize=2)
def session_for(run_config_json: str, partition_id: int, data_dir: str | None) -> Session:
    """Load the model and this client's data once per process and run."""
    config, _ = from_run_config(json.loads(run_config_json))
    config = prepare_config(config)
    if not 0 <= partition_id < config.num_clients:
        raise ConfigError(f"partition-id {partition_id} is outside the run's {config.num_clients} clients")
    if data_dir:
        config = dataclasses.replace(config, data_dir=data_dir)
    _, splits = load_partition(config, only_task=config.tasks[partition_id])
    [split] = [s for s in splits if s.client_id == partition_id]
    backbone = load_shared_backbone(config)
    client = local_client(config, backbone, train_settings(config, backbone), split)
    return Session(partition_id, create_method(config, client_infos(config)), client)


def session(context: Context) -> Session:
    data_dir = context.node_config.get("data-dir")
    return session_for(json.dumps(dict(context.run_config), sort_keys=True), partition_id_of(context),
                       str(data_dir) if data_dir else None)


def read_store(context: Context) -> dict:
    return tensors(context.state[STORE]) if STORE in context.state else {}


def write_store(context: Context, store: dict) -> None:
    context.state[STORE] = ArrayRecord({k: v.contiguous() for k, v in store.items()})


@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    """Which client this node is: the server maps node ids (new at every node start) to clients with it."""
    return Message(RecordDict({"info": MetricRecord({"partition-id": partition_id_of(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    current = session(context)
    ins, rnd, _ = decode_instruction(msg.content)
    store = read_store(context)
    update = current.method.client_train(current.client, ins, rnd, store)
    write_store(context, store)
    return Message(encode_update(update, current.partition_id), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    current = session(context)
    ins, rnd, final = decode_instruction(msg.content)
    metrics = current.method.client_evaluate(current.client, ins, rnd, read_store(context))
    adapted = current.client.adapted
    evaluation = Evaluation(metrics, (adapted.layout, adapted.state(PARTS)) if final else None)
    return Message(encode_evaluation(evaluation, current.partition_id), reply_to=msg)
