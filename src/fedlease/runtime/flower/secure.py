"""Secure aggregation (run-config ``secure-aggregation``, ``fedlease deploy --secure_aggregation``) with Flower's
SecAgg+: the server learns the sums, never a client's own upload.

SecAgg+ (``flwr.server.workflow.SecAggPlusWorkflow`` with ``flwr.client.mod.secaggplus_mod``; no cryptography is
written here) sums one vector per client over the round's participants. Per-group sums go through it by *slot
packing*: the method names, for each client, the sums its upload enters (``FederatedMethod.secure_slots``: the
shared adapter, its label set's head, its cluster's expert and router); every client uploads one vector with one
slot per sum of the round, each slot followed by a weight cell, puts its example-weighted upload (weight x values,
the weight ``examples / weight bound`` in the cell) into its own slots and zeros elsewhere. The one secure sum then
holds every slot's weighted sum and total weight; the server divides and hands each participant the averages of
its slots as its update, so the method's own ``aggregate_train`` forms exactly those averages again (the mean of
equal values) and the method code stays the in-process code.

Flower 1.42's workflow is written for the legacy Strategy API: it needs a ``LegacyContext`` whose strategy's
``configure_fit`` names the nodes and whose ``aggregate_fit`` receives the unmasked sum. ``Adapter`` is that
strategy; ``Workflow`` sends fedlease's own training messages in the stage that collects the masked vectors, and
polls the SuperLink every 0.1 s instead of 3 s (``FastGrid``). A method whose round is not a set of such sums (see
``secure_slots``) trains that round in the clear, logged.

Quantisation: SecAgg+ sums integers modulo 2**32. Each value (weight x parameter, at most ``CLIPPING_RANGE`` in
absolute value, checked on the client: a client above it does not take part in the round) is mapped by Flower's
stochastic rounding onto ``quantization_range(n)`` levels, the largest power of two whose n-fold sum stays below the
modulus for the n clients of the round (2**30 for 3 clients, 2**29 for 4 to 7, ...). Zeros are quantised exactly, so
a slot's sum is off by at most m x 2 x CLIPPING_RANGE / levels for its m contributors, and its average by that over
the slot's total weight.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD

from fedlease.config import RunConfig
from fedlease.errors import ConfigError, FedleaseError
from fedlease.methods.base import Instruction, Update, select

log = logging.getLogger("fedlease")

MIN_CLIENTS = 3  # SecAgg+ needs two; with two, each client could subtract its own vector from the sum
CLIPPING_RANGE = 4.0  # |weight x value| bound of every packed value (weights are at most 1)
MODULUS = 2 ** 32  # Flower's modulus_range (its documented maximum)
UNBOUNDED_WEIGHT = 2 ** 20  # the weight bound when --train_samples is "all"
RECORD = "fedlease-secure"  # a training message's slot layout and the receiving client's slots
SCHEMA = "schema"  # query.schema: the names, shapes and dtypes of what a client would upload
AUDIT = "FEDLEASE_SECURE_AUDIT"  # a folder: the server writes there everything its aggregation receives
REFUSED = {
    "ifca": "IFCA's server keeps each client's choice of cluster and its upload for that cluster apart",
    "local": "local training aggregates nothing",
}


def quantization_range(clients: int) -> int:
    """The largest power of two (at most 2**30: Flower quantises into int32) whose ``clients``-fold sum, and the
    clients' summed weight factors, stay below the modulus."""
    return 1 << min(30, ((MODULUS - 1) // clients).bit_length() - 1)


def threshold(clients: int) -> int:
    """Shares needed to unmask: a majority of the round's clients (every client shares with every other one)."""
    return clients // 2 + 1


def weight_bound(config: RunConfig) -> int:
    return config.train_samples if isinstance(config.train_samples, int) else UNBOUNDED_WEIGHT


def refuse(config: RunConfig) -> None:
    """The combinations secure aggregation cannot run, one line each."""
    if config.method in REFUSED:
        raise ConfigError(f"--secure_aggregation cannot run --method {config.method}: {REFUSED[config.method]}, "
                          f"so its aggregate is not a sum over a known group of clients")
    if config.dp_clip is not None and config.dp_unit == "record":
        raise ConfigError("--secure_aggregation with --dp_unit record is not supported yet: SecAgg+ rounds have not "
                          "been tested with DP-SGD clients (the server adds no noise there, so the two could combine)")
    if config.dp_clip is not None:
        raise ConfigError("--secure_aggregation with --dp_clip is not supported: the server's noise is added to each "
                          "aggregate it forms, and under SecAgg+ it never holds one before the sum is unmasked")
    if config.sample_rate is not None:
        raise ConfigError(f"--secure_aggregation needs a fixed number of clients a round (at least {MIN_CLIENTS}); "
                          f"--sample_rate may draw fewer: use --clients_per_round")
    per_round = config.clients_per_round or config.num_clients
    if per_round < MIN_CLIENTS:
        raise ConfigError(f"--secure_aggregation needs at least {MIN_CLIENTS} clients a round (SecAgg+ with fewer "
                          f"lets a client subtract its own vector from the sum), this run has {per_round}")
    if config.max_update_norm is not None and config.update_norm_action == "reject":
        raise ConfigError("--secure_aggregation cannot reject an update by its norm (the server never sees one "
                          "before the sum): use --update_norm_action clip")


# -- the slot layout ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slot:
    name: str
    tensors: tuple[tuple[str, tuple[int, ...], str], ...]  # name, shape, dtype
    offset: int  # where its values start in the packed vector; its weight cell follows them

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for _, shape, _ in self.tensors)


def build_layout(schemas: Mapping[str, Mapping[str, tuple[tuple[int, ...], str]]]) -> list[Slot]:
    """Slots in name order, each its tensors in name order and a weight cell."""
    slots, offset = [], 0
    for name in sorted(schemas):
        tensors = tuple((key, tuple(shape), dtype) for key, (shape, dtype) in sorted(schemas[name].items()))
        slots.append(Slot(name, tensors, offset))
        offset += slots[-1].size + 1
    return slots


def layout_length(slots: list[Slot]) -> int:
    return slots[-1].offset + slots[-1].size + 1 if slots else 0


def layout_to_json(slots: list[Slot]) -> str:
    return json.dumps([[s.name, s.offset, [[k, list(shape), dtype] for k, shape, dtype in s.tensors]] for s in slots])


def layout_from_json(text: str) -> list[Slot]:
    return [Slot(name, tuple((k, tuple(shape), dtype) for k, shape, dtype in tensors), offset)
            for name, offset, tensors in json.loads(text)]


def pack(update: Update, record: ConfigRecord) -> np.ndarray:
    """The client's packed vector: its weighted upload in its own slots, zeros elsewhere."""
    slots = {s.name: s for s in layout_from_json(str(record["layout"]))}
    own = {name: tuple(parts) for name, parts in json.loads(str(record["slots"])).items()}
    bound = int(record["weight-bound"])
    if not 0 < update.num_examples <= bound:
        raise FedleaseError(f"secure aggregation: {update.num_examples} training examples, outside the weight bound "
                            f"1..{bound} (--train_samples)")
    weight = update.num_examples / bound
    vector = np.zeros(layout_length(list(slots.values())), dtype=np.float64)
    used: set[str] = set()
    for name, parts in own.items():
        slot = slots[name]
        chosen = select(update.state, parts)
        if sorted(chosen) != [key for key, _, _ in slot.tensors]:
            raise FedleaseError(f"secure aggregation: the upload's {'/'.join(parts)} do not match slot {name}")
        position = slot.offset
        for key, shape, _ in slot.tensors:
            values = chosen[key].detach().cpu().double().reshape(-1).numpy()
            if tuple(chosen[key].shape) != shape:
                raise FedleaseError(f"secure aggregation: {key} has shape {tuple(chosen[key].shape)}, slot {name} "
                                    f"expects {shape}")
            vector[position:position + values.size] = weight * values
            position += values.size
        vector[position] = weight
        used |= set(chosen)
    if left := sorted(set(update.state) - used):
        raise FedleaseError(f"secure aggregation: {left[0]} is in no slot of this round")
    if not np.all(np.isfinite(vector)) or np.abs(vector).max(initial=0.0) > float(record["clip"]):
        raise FedleaseError(f"secure aggregation: a value of the weighted upload is outside +-{record['clip']} (the "
                            f"quantisation's clipping range); this client stays out of the round")
    return vector


def unpack(total: np.ndarray, slots: list[Slot], filled: set[str] | None = None
           ) -> dict[str, tuple[dict[str, torch.Tensor], float]]:
    """The average and total weight of every slot in ``filled`` (default: every slot with a positive weight)."""
    averages = {}
    for slot in slots:
        weight = float(total[slot.offset + slot.size])
        if (slot.name not in filled) if filled is not None else weight <= 0:
            continue
        if weight <= 0:
            raise FedleaseError(f"secure aggregation: slot {slot.name} has members but no weight")
        state, position = {}, slot.offset
        for key, shape, dtype in slot.tensors:
            n = math.prod(shape)
            values = torch.from_numpy(total[position:position + n] / weight).reshape(shape)
            state[key] = values.to(getattr(torch, dtype))
            position += n
        averages[slot.name] = (state, weight)
    return averages


# -- the client half: a mod that runs SecAgg+ only on messages that ask for it --------------------------------------

class Refused(Exception):
    """The ClientApp answered a secure training message with an error: it is passed on as that error."""

    def __init__(self, reply: Message) -> None:
        super().__init__("error reply")
        self.reply = reply


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """``secaggplus_mod`` for the training messages of a secure round (they carry its config record); every other
    message passes through untouched, so a run without secure aggregation is unchanged."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def handler(message: Message, ctx: Context) -> Message:
        reply = call_next(message, ctx)
        if reply.has_error():
            raise Refused(reply)
        return reply

    try:
        return secaggplus_mod(msg, context, handler)
    except Refused as refused:  # the node's own error (a diverged training, a value out of range) reaches the server
        return refused.reply


def secure_reply(update: Update, partition_id: int, record: ConfigRecord, evaluation: dict[str, float] | None,
                 evaluation_error: str | None) -> RecordDict:
    """A secure training reply in the legacy FitRes form ``secaggplus_mod`` masks: the packed vector as the
    parameters (the mod clears them after masking), weight 1 (the weights are inside the vector), and the metrics
    that travel in the clear as they do without secure aggregation."""
    vector = pack(update, record)
    metrics: dict = {"partition-id": partition_id}
    metrics.update({k: v for k, v in update.metrics.items() if isinstance(v, int | float)})
    metrics.update({f"evaluation.{k}": float(v) for k, v in (evaluation or {}).items()})
    if evaluation_error is not None:
        metrics["evaluation-error"] = evaluation_error
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([vector]), 1, metrics)
    return compat.fitres_to_recorddict(fitres, keep_input=False)


def schema_of(state: Mapping[str, torch.Tensor]) -> str:
    return json.dumps({k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()})


# -- the server half ----------------------------------------------------------------------------------------------

class FastGrid:
    """The grid SecAgg+ sends through: replies polled every 0.1 s (Flower's ``send_and_receive`` sleeps 3 s), and
    the bytes of each masked vector counted."""

    def __init__(self, grid, timeout: float) -> None:
        self.grid = grid
        self.timeout = timeout
        self.masked_bytes: dict[int, int] = {}  # node -> bytes of the masked vector it sent

    def send_and_receive(self, messages, *, timeout: float | None = None):
        ids = [mid for mid in self.grid.push_messages(own_contents(messages)) if mid]
        waiting, replies, start = set(ids), [], time.monotonic()
        while waiting and time.monotonic() - start < self.timeout:
            for reply in self.grid.pull_messages(list(waiting)):
                waiting.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
                if not reply.has_error() and RECORD_KEY_CONFIGS in reply.content.config_records:
                    masked = reply.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS)
                    if masked is not None:
                        self.masked_bytes[reply.metadata.src_node_id] = sum(len(b) for b in masked)
            if waiting:
                time.sleep(0.1)
        return replies


def own_contents(messages) -> list[Message]:
    """The workflow sends one RecordDict to every node of a stage, and secaggplus_mod pops keys from what it
    receives: harmless once serialised, but a grid that delivers objects (tests) needs a copy per node."""
    out, seen = [], set()
    for message in messages:
        if id(message.content) in seen:
            message = Message(copy.deepcopy(message.content), dst_node_id=message.metadata.dst_node_id,
                              message_type=message.metadata.message_type, group_id=message.metadata.group_id)
        seen.add(id(message.content))
        out.append(message)
    return out


class Adapter(Strategy):
    """The legacy strategy SecAgg+'s workflow asks: which nodes train (``configure_fit``) and, once unmasked, the
    sum (``aggregate_fit``: every result carries the same aggregate, never a client's own parameters)."""

    def __init__(self, grid, run_id: int, nodes: list[int]) -> None:
        self.grid, self.run_id, self.nodes = grid, run_id, nodes
        self.aggregate: np.ndarray | None = None
        self.results: list[tuple[int, FitRes]] = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(nid, self.grid, self.run_id), FitIns(Parameters([], ""), {})) for nid in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.results = [(proxy.node_id, res) for proxy, res in results]
        if results:
            [vector] = parameters_to_ndarrays(results[0][1].parameters)
            # Flower returns the weighted mean of the vectors (all weights are 1 here): the sum is that times n
            self.aggregate = vector * len(results)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class Workflow(SecAggPlusWorkflow):
    """SecAgg+ whose collect-masked-vectors stage carries fedlease's own training message to each node."""

    def __init__(self, contents: Mapping[int, RecordDict], clients: int, timeout: float) -> None:
        super().__init__(num_shares=1.0, reconstruction_threshold=threshold(clients), max_weight=1.0,
                         clipping_range=CLIPPING_RANGE, quantization_range=quantization_range(clients),
                         modulus_range=MODULUS, timeout=timeout)
        self.contents = dict(contents)
        self.state = None

    def setup_stage(self, grid, context, state) -> bool:
        self.state = state
        ok = super().setup_stage(grid, context, state)
        state.nid_to_fitins = dict(self.contents)  # sent with the encrypted key shares
        return ok


def run_secure_round(grid, context: Context, rnd: int, contents: Mapping[int, RecordDict], timeout: float
                     ) -> tuple[np.ndarray | None, list[tuple[int, FitRes]], list, FastGrid]:
    """One SecAgg+ round over the nodes of ``contents``: (the unmasked sum or None, each node's FitRes without
    parameters, the failures, the grid wrapper with the bytes sent)."""
    fast = FastGrid(grid, timeout)
    adapter = Adapter(grid, context.run_id, sorted(contents))
    legacy = LegacyContext(Context(run_id=context.run_id, node_id=context.node_id, node_config={},
                                   state=RecordDict(), run_config=context.run_config), strategy=adapter)
    legacy.state[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": rnd})
    legacy.state[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = Workflow(contents, len(contents), timeout)
    workflow(fast, legacy)
    state = workflow.state
    # the replies to the masked-vector stage: each node's metrics, their parameters already cleared by the mod
    results = [(proxy.node_id, res) for proxy, res in state.legacy_results] if state is not None else []
    failures = list(state.failures) if state is not None else []
    return adapter.aggregate, results, failures, fast


def audit(rnd: int, what: str, arrays: Mapping[str, np.ndarray]) -> None:
    """With FEDLEASE_SECURE_AUDIT set: write what the server's aggregation received (tests check it holds sums)."""
    folder = os.environ.get(AUDIT)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        np.savez(Path(folder) / f"round{rnd + 1}-{what}.npz", **dict(arrays))


def describe_error(error) -> tuple[int, str]:
    """(code, reason) of a SecAgg+ failure (an exception wrapping the reply's Error)."""
    inner = error.args[0] if getattr(error, "args", None) else error
    return int(getattr(inner, "code", -1)), str(getattr(inner, "reason", inner))


def secure_message(content: RecordDict, slots: list[Slot], own: Mapping[str, tuple[str, ...]], bound: int
                   ) -> RecordDict:
    content[RECORD] = ConfigRecord({"layout": layout_to_json(slots), "slots": json.dumps(dict(own)),
                                    "weight-bound": bound, "clip": CLIPPING_RANGE})
    return content


def schema_query(ins: Instruction) -> RecordDict:
    from fedlease.runtime.flower.messages import instruction_config

    return RecordDict({"config": ConfigRecord(instruction_config(Instruction(ins.layout, upload=ins.upload)))})

