"""The method's messages as Flower records.

An Instruction travels as an ArrayRecord (``state``) and a ConfigRecord (the layout, the part lists as
comma-separated strings, ``extra.*`` values, the round, and ``sync.*``: the run's id and the last round whose
update of this client the server accepted, see ``fedlease.runtime.client_state``). An Update comes back as an
ArrayRecord, a MetricRecord (``num-examples`` and the training metrics) and the sender's partition id; an
evaluation as a MetricRecord, plus, in the last round, the model the client was evaluated with.

A state travels packed: one flat array per dtype (Flower serialises them with numpy, without pickle) and a
ConfigRecord ``<key>-index`` naming each tensor's dtype, shape and offset. Flower stores and transfers every
array of a record as its own object, one request per object and hop (server, SuperLink, SuperNode, ClientApp),
with a 1 s back-off whenever a receiver asks before the sender has pushed it: a FedLEASE state of about a hundred
tensors cost 2.5 s more per message that way than packed (benchmarks/results/README.md, "Deployment"). Packing
keeps the values and their order, so a Flower mod that clips or masks a record's arrays sees the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlease.methods.base import Instruction, Update
from fedlease.model.experts import ExpertLayout
from fedlease.runtime.client_state import NO_ROUND
from fedlease.runtime.loop import Evaluation

LAYOUT_KEYS = ("num_experts", "own_expert", "routing", "top_k")
STATE_LOST = "state_lost"  # an update's metric: the node no longer held the client state the server expected
PART_LISTS = ("train", "upload", "restore", "keep")


def put_state(content: RecordDict, key: str, state: Mapping[str, torch.Tensor]) -> RecordDict:
    """Pack ``state`` into ``content[key]`` (one flat array per dtype) and ``content[key + "-index"]``."""
    groups: dict[str, list[torch.Tensor]] = {}
    ends: dict[str, int] = {}  # dtype -> the length of its flat array so far
    index = []
    for name, tensor in state.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        offset = ends.get(dtype, 0)
        groups.setdefault(dtype, []).append(tensor.detach().cpu().reshape(-1))
        ends[dtype] = offset + tensor.numel()
        index.append([name, dtype, list(tensor.shape), offset])
    content[key] = ArrayRecord({dtype: torch.cat(parts) for dtype, parts in groups.items()})
    content[f"{key}-index"] = ConfigRecord({"tensors": json.dumps(index)})
    return content


def get_state(content: RecordDict, key: str) -> dict[str, torch.Tensor]:
    """The state ``put_state`` packed into ``content``."""
    flat = dict(content[key].to_torch_state_dict()) if len(content[key]) else {}
    state = {}
    for name, dtype, shape, offset in json.loads(str(content[f"{key}-index"]["tensors"])):
        numel = torch.Size(shape).numel()
        state[name] = flat[dtype][offset:offset + numel].view(shape)
    return state


def encode_instruction(ins: Instruction, rnd: int, final: bool = False, federation: str = "",
                       accepted: int = NO_ROUND) -> RecordDict:
    config: dict = {"round": rnd, "final": final, "sync.federation": federation, "sync.accepted": accepted}
    config.update({f"layout.{k}": v for k, v in ins.layout.to_config().items()})
    config.update({part: ",".join(getattr(ins, part)) for part in PART_LISTS})
    config.update({f"extra.{k}": v for k, v in ins.extra.items()})
    return put_state(RecordDict({"config": ConfigRecord(config)}), "state", ins.state)


def decode_instruction(content: RecordDict) -> tuple[Instruction, int, bool]:
    config = content["config"]
    layout = ExpertLayout.from_config({k: config[f"layout.{k}"] for k in LAYOUT_KEYS})
    parts = {part: tuple(p for p in str(config[part]).split(",") if p) for part in PART_LISTS}
    extra = {k.removeprefix("extra."): v for k, v in config.items() if k.startswith("extra.")}
    ins = Instruction(layout, get_state(content, "state"), extra=extra, **parts)
    return ins, int(config["round"]), bool(config["final"])


def decode_sync(content: RecordDict) -> tuple[str, int]:
    """The run's id and the last round whose update of the receiving client the server accepted."""
    config = content["config"]
    return str(config["sync.federation"]), int(config["sync.accepted"])


def encode_update(update: Update, partition_id: int) -> RecordDict:
    metrics = {"num-examples": update.num_examples, "partition-id": partition_id}
    metrics.update({k: v for k, v in update.metrics.items() if isinstance(v, int | float)})
    return put_state(RecordDict({"metrics": MetricRecord(metrics)}), "state", update.state)


def decode_update(content: RecordDict) -> tuple[int, Update]:
    metrics = dict(content["metrics"])
    partition_id = int(metrics.pop("partition-id"))
    num_examples = metrics.pop("num-examples")
    return partition_id, Update(get_state(content, "state"), num_examples, metrics)


def encode_evaluation(evaluation: Evaluation, partition_id: int) -> RecordDict:
    content = RecordDict({"metrics": MetricRecord({**evaluation.metrics, "partition-id": partition_id})})
    if evaluation.final is not None:
        layout, state = evaluation.final
        put_state(content, "final-state", state)
        content["final-layout"] = ConfigRecord(layout.to_config())
    return content


def decode_evaluation(content: RecordDict) -> tuple[int, Evaluation]:
    metrics = dict(content["metrics"])
    partition_id = int(metrics.pop("partition-id"))
    final = None
    if "final-state" in content:
        final = (ExpertLayout.from_config(dict(content["final-layout"])), get_state(content, "final-state"))
    return partition_id, Evaluation({k: float(v) for k, v in metrics.items()}, final)
