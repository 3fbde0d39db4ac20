"""The Flower ClientApp: one client (one partition) per SuperNode, running the method's client half.

A SuperNode is told which client it is by its node config: ``partition-id`` (set by Flower in simulation;
``flower-supernode --node-config "partition-id=3"`` in deployment) and, optionally, ``data-dir``, a local GLUE
folder that replaces the run's ``data-dir`` on that node, ``instruction-dir``, a local folder of instruction data
that replaces the run's ``instruction-dir`` on that node and need only hold the node's own category, and
``state-dir``, a node-local folder for the client's own state. The node loads only its own task's data and
draws its own slice, exactly the slice the in-process runner gives that client.

The client's own store (state that never leaves it, such as FedSA's B) is versioned by the rule of
``fedlease.runtime.client_state``: what a training round produces only becomes current once the server has
accepted that round's update. It lives in ``state-dir`` when the node config names one (it then survives a
restart of the node), else in the SuperNode's memory (Flower's node state: it lasts one ``flwr run``, so it is
lost when the node restarts and when the run is resumed, which is a new ``flwr run``; logged as such).

The model and the client's data are loaded once per process and run (``session_for``). Flower's own executors
start a fresh process for every message; ``fedlease.runtime.flower.executor`` keeps one process per node.
A problem a user can fix (a partition id outside the run, a data folder without the node's task, a state folder
that cannot be used) is logged on the node as one line and answered as an error, which the server logs; the
rest of the federation goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlease.config import RunConfig, expand_tasks
from fedlease.data.instructions import register_instruction_folder, register_remote_tasks
from fedlease.data.tasks import TASKS
from fedlease.errors import ConfigError, DataError, FedleaseError, describe
from fedlease.methods import create_method
from fedlease.methods.base import FederatedMethod
from fedlease.model.backbone import resolve_device
from fedlease.model.experts import PARTS
from fedlease.runtime.client_state import ClientState, FolderBackend, Owner
from fedlease.runtime.clients import client_infos, load_partition, load_shared_backbone, local_client, train_settings
from fedlease.runtime.flower.messages import (
    DIVERGED_CODE,
    STATE_LOST,
    decode_evaluate_first,
    decode_instruction,
    decode_sync,
    encode_evaluation,
    encode_training_error,
    encode_update,
    instruction_from,
    put_state,
)
from fedlease.runtime.flower.run_config import from_run_config
from fedlease.runtime.flower.secure import RECORD, schema_of, secure_aggregation_mod, secure_reply
from fedlease.runtime.loop import Evaluation
from fedlease.runtime.simulation import prepare_config
from fedlease.train import LocalClient, TrainingDiverged, resolve_precision

app = ClientApp(mods=[secure_aggregation_mod])  # SecAgg+ on the training messages of a secure round only
log = logging.getLogger("fedlease")

STATE = "fedlease-client-state"  # the record holding the client's state in Flower's node state
SCHEMA_ACTION = "schema"  # query.schema
INITIAL_ACTION = "initial"  # query.initial
ERROR_CODE = 0x7E1E  # a user-fixable problem on the node (Flower's own error codes are small integers)


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


def with_node_instructions(config: RunConfig, folder: str, partition_id: int) -> RunConfig:
    """The run as a node with its own instruction folder sees it: its task is read from that folder, and the
    run's other user tasks (which the server has checked) are held by other nodes."""
    tasks = expand_tasks(config.tasks)
    own = register_instruction_folder(folder)
    task = tasks[partition_id] if 0 <= partition_id < len(tasks) else None
    spec = TASKS.get(task) if task else None
    if task and task not in own and (spec is None or spec.source in ("jsonl", "remote")):  # a user's category
        raise DataError(f"this node's instruction-dir {folder} has no category {task!r} "
                        f"(it has: {' '.join(own)})")
    register_remote_tasks(tasks, folder)
    return dataclasses.replace(config, instruction_dir=folder)


def node_run_config(run_config: dict, partition_id: int, instruction_dir: str | None) -> RunConfig:
    """The run's configuration with this node's own instruction folder, checked and resolved."""
    config, _ = from_run_config(run_config)
    if instruction_dir:
        config = with_node_instructions(config, instruction_dir, partition_id)
    config = prepare_config(config)
    if not 0 <= partition_id < config.num_clients:
        raise ConfigError(f"partition-id {partition_id} is outside the run's {config.num_clients} clients "
                          f"(0..{config.num_clients - 1})")
    return config


@functools.lru_cache(maxsize=2)
def session_for(run_config_json: str, partition_id: int, data_dir: str | None,
                instruction_dir: str | None = None) -> Session:
    """Load the model and this client's data once per process and run."""
    config = node_run_config(json.loads(run_config_json), partition_id, instruction_dir)
    if data_dir:
        config = dataclasses.replace(config, data_dir=data_dir)
    _, splits = load_partition(config, only_task=config.tasks[partition_id])
    [split] = [s for s in splits if s.client_id == partition_id]
    backbone = load_shared_backbone(config)
    client = local_client(config, backbone, train_settings(config, backbone), split)
    return Session(partition_id, create_method(config, client_infos(config)), client)


def node_folder(context: Context, key: str) -> str | None:
    value = context.node_config.get(key)
    return str(value) if value else None


def session(context: Context) -> Session:
    return session_for(json.dumps(dict(context.run_config), sort_keys=True), partition_id_of(context),
                       node_folder(context, "data-dir"), node_folder(context, "instruction-dir"))


class RecordBackend:
    """The client's state as byte strings in Flower's node state (``context.state``)."""

    where = "SuperNode's memory (no state-dir in its node config)"

    def __init__(self, context: Context) -> None:
        self.context = context

    def record(self) -> ConfigRecord:
        if STATE not in self.context.state:
            self.context.state[STATE] = ConfigRecord()
        return self.context.state[STATE]

    def get(self, name: str) -> bytes | None:
        return self.record().get(name)

    def put(self, name: str, payload: bytes) -> None:
        self.record()[name] = payload

    def delete(self, name: str) -> None:
        self.record().pop(name, None)

    def names(self) -> list[str]:
        return list(self.record())


@functools.cache
def warn_memory_state(partition_id: int) -> None:
    log.warning("client %d: no state-dir in this node's config; its own state lives in the SuperNode's memory and "
                "is lost if the node restarts or the run is resumed (flower-supernode --node-config "
                "\"... state-dir=FOLDER\")", partition_id)


def client_state(context: Context, federation: str, partition_id: int) -> ClientState:
    folder = context.node_config.get("state-dir")
    if folder:
        backend = FolderBackend(Path(str(folder)))
    else:
        warn_memory_state(partition_id)
        backend = RecordBackend(context)
    return ClientState(backend, Owner(federation, partition_id))


def working_store(msg: Message, context: Context, current: Session, training: int | None = None
                  ) -> tuple[ClientState, dict[str, torch.Tensor], bool]:
    """The client's state, reconciled with the server's last accepted round, and the store to work from (for
    training round ``training``, see ``ClientState.current``); a node that no longer holds the version the server
    expects continues from the empty store (logged, and reported)."""
    federation, accepted = decode_sync(msg.content)
    state = client_state(context, federation, current.partition_id)
    store = state.current(accepted, training)
    if store is None:
        log.warning("client %d: its own state of round %d is not in the %s (the node lost it); it continues from "
                    "the initial state", current.partition_id, accepted + 1, state.backend.where)
        return state, {}, True
    return state, store, False


def answer(msg: Message, context: Context, handle: Callable[[Message, Context], Message]) -> Message:
    """Run a handler; a problem the user can fix is one line in the node's log and an error reply."""
    try:
        return handle(msg, context)
    except TrainingDiverged as exc:  # not the node's problem: the server stops the run with this line
        log.error("fedlease: error: %s", exc)
        return Message(Error(code=DIVERGED_CODE, reason=str(exc)), reply_to=msg)
    except FedleaseError as exc:
        log.error("fedlease: error: %s", exc)
        return Message(Error(code=ERROR_CODE, reason=f"fedlease: {exc}"), reply_to=msg)


def node_description(config) -> dict[str, str]:
    """Where and how this node trains: its device, precision and library versions (recorded by the server)."""
    import platform
    from importlib.metadata import version

    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device, config.quantization)
    described = {"device": str(device), "precision": "fp32" if dtype is None else f"autocast {dtype}",
                 "python": platform.python_version()}
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
    for package in ("fedlease", "torch", "transformers", "flwr"):
        described[package] = version(package)
    return described


@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    """Which client this node is: the server maps node ids (new at every node start) to clients with it."""
    def handle(msg: Message, context: Context) -> Message:
        partition_id = partition_id_of(context)
        config = node_run_config(dict(context.run_config), partition_id, node_folder(context, "instruction-dir"))
        return Message(RecordDict({"info": MetricRecord({"partition-id": partition_id}),
                                   "node": ConfigRecord(node_description(config))}), reply_to=msg)

    return answer(msg, context, handle)


@app.query(SCHEMA_ACTION)
def schema(msg: Message, context: Context) -> Message:
    """Secure aggregation: the names, shapes and dtypes (no values) of what this client uploads under the message's
    layout, for the server's slot layout (it loads no model)."""
    def handle(msg: Message, context: Context) -> Message:
        current = session(context)
        ins = instruction_from(msg.content["config"], {})
        current.client.adapted.configure(ins.layout)
        return Message(RecordDict({"schema": ConfigRecord({"tensors": schema_of(current.client.state(ins.upload))})}),
                       reply_to=msg)

    return answer(msg, context, handle)


@app.query(INITIAL_ACTION)
def initial(msg: Message, context: Context) -> Message:
    """Differential privacy: the seeded initial LoRA and head for the message's seed, the reference of an aggregate
    no client has downloaded yet (the server loads no model). Public: the run's seed and the public model make it,
    the same on every node; nothing of the client's data or training is in it."""
    def handle(msg: Message, context: Context) -> Message:
        current = session(context)
        state = current.client.adapted.initial_state(int(msg.content["config"]["seed"]))
        return Message(put_state(RecordDict(), "state", state), reply_to=msg)

    return answer(msg, context, handle)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train a round; first, where the message carries one, run the previous round's evaluation (on the same
    store: training has not touched it yet), as a separate evaluate message would. If that evaluation fails,
    the client still trains, and the reply carries the update and the evaluation's error; if the training
    fails, the reply carries the evaluation and the training's error."""
    def handle(msg: Message, context: Context) -> Message:
        start = time.perf_counter()
        current = session(context)
        ins, rnd, _ = decode_instruction(msg.content)
        state, store, lost = working_store(msg, context, current, rnd)
        evaluation, evaluation_seconds, evaluation_error = None, 0.0, None
        if (first := decode_evaluate_first(msg.content, ins.state)) is not None:
            evaluated, before = first
            began = time.perf_counter()
            try:
                evaluation = current.method.client_evaluate(current.client, before, evaluated, store)
            except Exception as exc:  # as with a separate evaluate message, a failed evaluation costs no training
                log.exception("client %d: the evaluation of round %d failed; it trains round %d all the same",
                              current.partition_id, evaluated + 1, rnd + 1)
                evaluation_error = describe(exc)
            evaluation_seconds = time.perf_counter() - began
        try:
            update = current.method.client_update(current.client, ins, rnd, store)
        except Exception as exc:
            if evaluation is None or RECORD in msg.content:  # secure: an error reply, and the node leaves the sum
                raise
            # the evaluation that came first is still worth its reply, as a separate message's would have been
            log.exception("client %d: training round %d failed", current.partition_id, rnd + 1)
            diverged = isinstance(exc, TrainingDiverged)
            return Message(encode_training_error(current.partition_id, str(exc) if diverged else describe(exc),
                                                 evaluation, diverged), reply_to=msg)
        state.stage(rnd, store)  # current only once the server has accepted this update
        if lost:
            update.metrics[STATE_LOST] = 1.0
        if evaluation is not None:
            update.metrics["evaluation_seconds"] = evaluation_seconds  # the evaluation this message asked for first
        update.metrics["node_seconds"] = time.perf_counter() - start  # the whole message on the node
        if RECORD in msg.content:  # secure aggregation: the packed vector, which secaggplus_mod masks
            return Message(secure_reply(update, current.partition_id, msg.content[RECORD], evaluation,
                                        evaluation_error), reply_to=msg)
        return Message(encode_update(update, current.partition_id, evaluation, evaluation_error), reply_to=msg)

    return answer(msg, context, handle)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    def handle(msg: Message, context: Context) -> Message:
        current = session(context)
        ins, rnd, final = decode_instruction(msg.content)
        _, store, _ = working_store(msg, context, current)
        metrics = current.method.client_evaluate(current.client, ins, rnd, store)
        adapted = current.client.adapted
        evaluation = Evaluation(metrics, (adapted.layout, adapted.state(PARTS)) if final else None)
        return Message(encode_evaluation(evaluation, current.partition_id), reply_to=msg)

    return answer(msg, context, handle)
