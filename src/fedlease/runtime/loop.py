"""The round loop every runtime shares; runtimes differ only in how messages reach the clients.

A round: the method configures what each client trains; the transport runs the clients (in this process, or
on Flower SuperNodes) and returns their updates; every update is validated; the method aggregates the valid
ones; the transport evaluates each client with what the method says; the recorder writes the round's
artifacts; a checkpoint is saved. Clients that fail, time out or send a rejected update are left out of that
round and logged, and the run goes on.

Every message also carries a :class:`Sync`: the run's id and the last round whose update of the client the
server accepted, so that a client's own state only ever advances with what the server accepted
(``fedlease.runtime.client_state``). Both are saved with each checkpoint.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from fedlease.config import RunConfig
from fedlease.methods.base import FederatedMethod, Instruction, Update
from fedlease.model.experts import ExpertLayout
from fedlease.report.artifacts import METRIC_LABELS, RunRecorder, headline
from fedlease.runtime.checkpoint import Checkpoint, save_checkpoint
from fedlease.runtime.client_state import NO_ROUND
from fedlease.runtime.validation import UpdateValidator

log = logging.getLogger("fedlease")


@dataclass
class Evaluation:
    metrics: dict[str, float]
    # In the last round: the model the client was evaluated with (saved as final/client_<id>.safetensors).
    final: tuple[ExpertLayout, dict[str, torch.Tensor]] | None = None


@dataclass(frozen=True)
class Sync:
    """What every message tells a client besides the method's instruction."""

    federation: str  # the run's id, drawn once and kept across resumes
    accepted: Mapping[int, int]  # client -> the last round whose update the server accepted

    def of(self, cid: int) -> int:
        return self.accepted.get(cid, NO_ROUND)


class Transport(Protocol):
    def train(self, rnd: int, instructions: Mapping[int, Instruction], sync: Sync) -> dict[int, Update]:
        """Run the method's client half for each instruction; clients that fail are absent from the result."""

    def evaluate(self, rnd: int, instructions: Mapping[int, Instruction], final: bool, sync: Sync
                 ) -> dict[int, Evaluation]:
        """Evaluate each client; with ``final``, also return the model it was evaluated with."""

    def client_stores(self, sync: Sync) -> dict[int, dict[str, torch.Tensor]] | None:
        """The clients' committed stores, where the runtime holds them (for checkpoints), else None."""


@dataclass
class Federation:
    config: RunConfig
    method: FederatedMethod
    transport: Transport
    recorder: RunRecorder
    out: Path
    info: dict = field(default_factory=dict)  # saved with each checkpoint (model source, precision, ...)
    validator: UpdateValidator | None = None

    def __post_init__(self) -> None:
        if self.validator is None:
            self.validator = UpdateValidator(self.config.max_update_norm)
        self.info.setdefault("federation", uuid.uuid4().hex)
        self.accepted: dict[int, int] = {}

    def sync(self) -> Sync:
        return Sync(self.info["federation"], dict(self.accepted))

    def run(self, start_round: int = 0) -> dict:
        for rnd in range(start_round, self.config.global_rounds):
            self.round(rnd)
        return self.recorder.finish()

    def round(self, rnd: int) -> dict:
        config, method = self.config, self.method
        last = rnd == config.global_rounds - 1
        start = time.perf_counter()
        log.info("round %d/%d", rnd + 1, config.global_rounds)
        instructions = method.configure_train(rnd)
        # in client order: replies arrive in any order, and a floating-point average depends on its order
        updates = dict(sorted(self.transport.train(rnd, instructions, self.sync()).items()))
        for cid in sorted(set(instructions) - set(updates)):
            log.info("round %d: client %d did not reply; left out of this round", rnd + 1, cid)
        accepted, rejected = self.validator.filter(instructions, updates)
        for cid, reason in sorted(rejected.items()):
            log.info("round %d: rejected the update of client %d: %s", rnd + 1, cid, reason)
        self.accepted.update(dict.fromkeys(accepted, rnd))
        report = method.aggregate_train(rnd, accepted)
        for line in report.log:
            log.info("%s", line)
        evaluations = self.transport.evaluate(rnd, method.configure_evaluate(rnd), last, self.sync())
        metrics = {cid: e.metrics for cid, e in evaluations.items()}
        summary = self.recorder.record_round(rnd, report, instructions, accepted, metrics, method.client_map(),
                                             time.perf_counter() - start, rejected=rejected)
        if last:
            self.recorder.save_final_models({cid: e.final for cid, e in evaluations.items() if e.final},
                                            self.info.get("model_source", config.model_name))
        self.checkpoint(rnd)
        key = headline(summary["mean"])
        per_task = "  ".join(f"{task} {100 * v[key]:.2f}" for task, v in summary["tasks"].items())
        log.info("round %d (%s): %s %s | mean %.2f | %.1fs", rnd + 1, report.phase, METRIC_LABELS[key], per_task,
                 100 * summary["mean"].get(key, float("nan")), summary["seconds"])
        return summary

    def checkpoint(self, rnd: int) -> None:
        stores = self.transport.client_stores(self.sync())
        state = {"method": self.method.server_state(), "validator": self.validator.state_dict(),
                 "accepted": {str(cid): r for cid, r in sorted(self.accepted.items())}}
        save_checkpoint(self.out, Checkpoint(rnd, self.config.to_dict(), state, stores or {},
                                             self.recorder.history, dict(self.info)))

    def restore(self, ckpt: Checkpoint) -> int:
        """Continue from a checkpoint; return the first round still to run."""
        self.method.load_server_state(ckpt.method_state["method"])
        self.validator.load_state_dict(ckpt.method_state["validator"])
        self.recorder.history = ckpt.history
        self.info["federation"] = ckpt.info.get("federation", self.info["federation"])
        if "accepted" in ckpt.method_state:
            self.accepted = {int(cid): int(r) for cid, r in ckpt.method_state["accepted"].items()}
        else:  # a checkpoint from before accepted rounds were kept: every store was as of the last round
            self.accepted = dict.fromkeys((c.client_id for c in self.method.clients), ckpt.round)
        return ckpt.round + 1
