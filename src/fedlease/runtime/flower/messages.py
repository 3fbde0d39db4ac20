"""The method's messages as Flower records.

An Instruction travels as an ArrayRecord (``state``) and a ConfigRecord (the layout, the part lists as
comma-separated strings, ``extra.*`` values, the round, and ``sync.*``: the run's id and the last round whose
update of this client the server accepted, see ``fedlease.runtime.client_state``). An Update comes back as an
ArrayRecord, a MetricRecord (``num-examples`` and the training metrics) and the sender's partition id; an
evaluation as a MetricRecord, plus, in the last round, the model the client was evaluated with.

A training message may also carry the previous round's evaluation (``fedlease.runtime.loop``: one message per
client and round): its instruction as ``evaluate-config`` and ``evaluate-state``, where the state holds only the
tensors the training state does not already carry under the same name with the same values (``evaluate-shared``
names the others; with FedLEASE's experts, or one shared adapter, the two states are equal and travel once). The
reply then carries the evaluation's metrics as ``evaluation``, or, where the evaluation failed on the node (the
client trains all the same), its reason as ``evaluation-error``; where the training failed after the evaluation,
the reply holds the evaluation and the reason as ``training-error``, and no update. A training that diverged (a
NaN or infinite loss) stops the run, as it does in process: the reply is an error with ``DIVERGED_CODE``, or, after
an evaluation, a ``training-error`` marked ``diverged``.

A state travels packed: one flat array per dtype (Flower serialises them with numpy, without pickle) and a
ConfigRecord ``<key>-index`` naming each tensor's dtype, shape and offset. Flower stores and transfers every
array of a record as its own object, one request per object and hop (server, SuperLink, SuperNode, ClientApp),
with a 1 s back-off whenever a receiver asks before the sender has pushed it: a FedLEASE state of about a hundred
tensors cost 2.5 s more per message that way than packed (benchmarks/results/details.md, "Deployment"). Packing
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
DIVERGED_CODE = 0x7E1D  # an error reply's code: the client's training diverged (its reason: the one-line message)
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


def instruction_config(ins: Instruction) -> dict:
    config = {f"layout.{k}": v for k, v in ins.layout.to_config().items()}
    config.update({part: ",".join(getattr(ins, part)) for part in PART_LISTS})
    config.update({f"extra.{k}": v for k, v in ins.extra.items()})
    return config


def instruction_from(config: ConfigRecord, state: dict[str, torch.Tensor]) -> Instruction:
    layout = ExpertLayout.from_config({k: config[f"layout.{k}"] for k in LAYOUT_KEYS})
    parts = {part: tuple(p for p in str(config[part]).split(",") if p) for part in PART_LISTS}
    extra = {k.removeprefix("extra."): v for k, v in config.items() if k.startswith("extra.")}
    return Instruction(layout, state, extra=extra, **parts)


def encode_instruction(ins: Instruction, rnd: int, final: bool = False, federation: str = "",
                       accepted: int = NO_ROUND, evaluate_first: tuple[int, Instruction] | None = None
                       ) -> RecordDict:
    """``evaluate_first``: (round, instruction) of an evaluation the client runs before it trains."""
    config: dict = {"round": rnd, "final": final, "sync.federation": federation, "sync.accepted": accepted}
    config.update(instruction_config(ins))
    content = put_state(RecordDict({"config": ConfigRecord(config)}), "state", ins.state)
    if evaluate_first is not None:
        evaluated, before = evaluate_first
        shared = {name for name, tensor in before.state.items()  # torch.equal ignores dtype: compare it too
                  if name in ins.state and ins.state[name].dtype == tensor.dtype
                  and (ins.state[name] is tensor or torch.equal(ins.state[name], tensor))}
        own = {name: tensor for name, tensor in before.state.items() if name not in shared}
        content["evaluate-config"] = ConfigRecord({"round": evaluated, "order": json.dumps(list(before.state)),
                                                   "shared": json.dumps(sorted(shared)), **instruction_config(before)})
        put_state(content, "evaluate-state", own)
    return content


def decode_instruction(content: RecordDict) -> tuple[Instruction, int, bool]:
    config = content["config"]
    return instruction_from(config, get_state(content, "state")), int(config["round"]), bool(config["final"])


def decode_evaluate_first(content: RecordDict, state: Mapping[str, torch.Tensor]
                          ) -> tuple[int, Instruction] | None:
    """The (round, instruction) of the evaluation a training message asks for before training, if any;
    ``state``: the message's training state, already decoded (the shared tensors are taken from it)."""
    if "evaluate-config" not in content:
        return None
    config = content["evaluate-config"]
    own = get_state(content, "evaluate-state")
    shared = set(json.loads(str(config["shared"])))
    ordered = {name: state[name] if name in shared else own[name] for name in json.loads(str(config["order"]))}
    return int(config["round"]), instruction_from(config, ordered)


def decode_sync(content: RecordDict) -> tuple[str, int]:
    """The run's id and the last round whose update of the receiving client the server accepted."""
    config = content["config"]
    return str(config["sync.federation"]), int(config["sync.accepted"])


def encode_update(update: Update, partition_id: int, evaluation: dict[str, float] | None = None,
                  evaluation_error: str | None = None) -> RecordDict:
    """``evaluation``: the metrics of the evaluation the training message asked for first; ``evaluation_error``:
    why that evaluation failed, if it did."""
    metrics = {"num-examples": update.num_examples, "partition-id": partition_id}
    metrics.update({k: v for k, v in update.metrics.items() if isinstance(v, int | float)})
    content = put_state(RecordDict({"metrics": MetricRecord(metrics)}), "state", update.state)
    if evaluation is not None:
        content["evaluation"] = MetricRecord(evaluation)
    if evaluation_error is not None:
        content["evaluation-error"] = ConfigRecord({"reason": evaluation_error})
    return content


def decode_update(content: RecordDict) -> tuple[int, Update]:
    metrics = dict(content["metrics"])
    partition_id = int(metrics.pop("partition-id"))
    num_examples = metrics.pop("num-examples")
    return partition_id, Update(get_state(content, "state"), num_examples, metrics)


def decode_update_evaluation(content: RecordDict) -> dict[str, float] | None:
    """The metrics of the evaluation a training reply carries, if any."""
    return {k: float(v) for k, v in content["evaluation"].items()} if "evaluation" in content else None


def encode_training_error(partition_id: int, reason: str, evaluation: dict[str, float], diverged: bool = False
                          ) -> RecordDict:
    """A training message's reply when the evaluation it asked for first succeeded and the training failed
    (``diverged``: its loss became NaN or infinite)."""
    return RecordDict({"metrics": MetricRecord({"partition-id": partition_id}), "evaluation": MetricRecord(evaluation),
                       "training-error": ConfigRecord({"reason": reason, "diverged": diverged})})


def decode_diverged(content: RecordDict) -> bool:
    """Whether a reply's failed training diverged."""
    return "training-error" in content and bool(content["training-error"].get("diverged", False))


def decode_failure(content: RecordDict, part: str) -> str | None:
    """Why one part of a training message failed on the node, if the reply says so: ``part`` is
    ``"training-error"`` (the reply then carries no update) or ``"evaluation-error"`` (the evaluation the message
    asked for first)."""
    return str(content[part]["reason"]) if part in content else None


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
