"""The round loop every runtime shares; runtimes differ only in how messages reach the clients.

A round: the sampler (``fedlease.runtime.participation``) draws the round's cohort, from the clients the
transport can reach; the method configures what each of them trains; the transport runs them (in this process,
or on Flower SuperNodes) and returns their updates; every update is validated; the method aggregates the valid
ones; the transport evaluates the cohort (every client after the last round and every ``--eval_every`` rounds)
with what the method says; the recorder writes the round's artifacts; a checkpoint is saved. Clients that fail,
time out or send a rejected update are left out of that round and logged, and the run goes on. A round whose
cohort is empty (Poisson sampling can draw nobody) is skipped and logged. After the last round, the clients held
out of training (``--unseen_clients``) are evaluated with what the method gives a newcomer.

Every message also carries a :class:`Sync`: the run's id and the last round whose update of the client the
server accepted, so that a client's own state only ever advances with what the server accepted
(``fedlease.runtime.client_state``). Both are saved with each checkpoint.

A transport with ``fuses_evaluation`` (Flower), in a closed federation, evaluates a round with the next round's
training messages (with sampling, the next cohort is another set of clients, so each round is evaluated on its
own): one
message per client and round instead of two (each message after a node's first waits for Flower's idle poll).
The client evaluates first, with exactly what it would have been sent alone, then trains, so the results are
those of separate messages. The round is recorded and checkpointed when those replies arrive, before the next
round's updates are checked; its ``seconds`` end with its aggregation, and the exchange that carries its
evaluation (and its recording) counts in the next round's. A client whose message is lost misses both, and one
round timeout covers both. The last round is evaluated on its own, with the final models.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from fedlease.config import RunConfig
from fedlease.methods.base import FederatedMethod, Instruction, RoundReport, Update
from fedlease.model.experts import ExpertLayout
from fedlease.privacy import PrivacyLedger, enabled, record_level
from fedlease.privacy.record import RecordLedger
from fedlease.report.artifacts import METRIC_LABELS, RunRecorder, headline
from fedlease.runtime.checkpoint import Checkpoint, save_checkpoint
from fedlease.runtime.client_state import NO_ROUND
from fedlease.runtime.participation import Participation
from fedlease.runtime.validation import UpdateValidator
from fedlease.train import TrainingDiverged

log = logging.getLogger("fedlease")


@dataclass
class Evaluation:
    metrics: dict[str, float]
    # In the last round: the model the client was evaluated with (saved as final/client_<id>.safetensors).
    final: tuple[ExpertLayout, dict[str, torch.Tensor]] | None = None


# Takes a client's final model as its evaluation arrives (client, layout, state): saved at once, never held for
# the whole federation.
FinalSink = Callable[[int, ExpertLayout, Mapping[str, torch.Tensor]], None]


@dataclass(frozen=True)
class Sync:
    """What every message tells a client besides the method's instruction."""

    federation: str  # the run's id, drawn once and kept across resumes
    accepted: Mapping[int, int]  # client -> the last round whose update the server accepted

    def of(self, cid: int) -> int:
        return self.accepted.get(cid, NO_ROUND)


class Transport(Protocol):
    fuses_evaluation: bool  # True: evaluate_then_train sends a round's evaluation with the next round's training

    def train(self, rnd: int, instructions: Mapping[int, Instruction], sync: Sync) -> dict[int, Update]:
        """Run the method's client half for each instruction; clients that fail are absent from the result. A
        client whose training diverged stops the run: ``TrainingDiverged``, naming the round and the client."""

    def evaluate(self, rnd: int, instructions: Mapping[int, Instruction], final: FinalSink | None, sync: Sync
                 ) -> dict[int, Evaluation]:
        """Evaluate each client; with ``final``, hand it the model each client was evaluated with."""

    def evaluate_then_train(self, evaluated: int | None, evaluations: Mapping[int, Instruction], rnd: int,
                            instructions: Mapping[int, Instruction], sync: Sync
                            ) -> tuple[dict[int, Evaluation], dict[int, Update]]:
        """With ``fuses_evaluation``: one message per client evaluates round ``evaluated`` and trains ``rnd``; a
        training that diverged raises ``Diverged`` with the evaluations that arrived."""

    def client_stores(self, sync: Sync) -> dict[int, dict[str, torch.Tensor]] | None:
        """The clients' committed stores, where the checkpoint must hold them, else None (they are kept where
        the clients are: a Flower node's state, a folder per client in process)."""

    def available(self) -> list[int] | None:
        """The clients that can be reached for a round now (None: every client)."""


class Diverged(TrainingDiverged):
    """A client's training diverged on a transport that evaluates a round with the next round's training: the run
    stops, as in process, once the previous round is recorded with the ``evaluations`` those replies carried."""

    def __init__(self, message: str, evaluations: Mapping[int, Evaluation]) -> None:
        super().__init__(message)
        self.evaluations = dict(evaluations)


@dataclass
class Trained:
    """A round trained and aggregated, not yet evaluated."""

    rnd: int
    report: RoundReport
    instructions: dict[int, Instruction]
    accepted: dict[int, Update]
    rejected: dict[int, str]
    seconds: float
    evaluate: dict[int, Instruction]  # the model each client is evaluated with
    delivered: set[int]  # the clients that received the round's training message


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
            reject = self.config.update_norm_action == "reject"  # clip: the clients bound their changes themselves
            self.validator = UpdateValidator(self.config.max_update_norm if reject else None)
        self.info.setdefault("federation", uuid.uuid4().hex)
        self.accepted: dict[int, int] = {}
        self.participation = Participation(self.config)
        self.privacy = PrivacyLedger(self.config, self.method.privacy_plan(self.config)) if enabled(self.config) \
            else None
        if self.privacy is not None:
            self.method.noisy = self.privacy.noisy
            log.info("differential privacy: clip %g, noise multiplier %.4f, delta %g; the run's plan spends "
                     "epsilon %.3f (%s)", self.config.dp_clip, self.privacy.noise, self.privacy.delta,
                     self.privacy.record()["planned_epsilon"], self.privacy.record()["accountant"])
        self.record_privacy = RecordLedger(self.config) if record_level(self.config) else None
        if self.record_privacy is not None:
            config = self.config
            log.info("differential privacy per example (DP-SGD on every client): clip %g, %s, delta %g (%s)",
                     config.dp_clip, f"noise multiplier {config.dp_noise:g}" if config.dp_noise is not None else
                     f"each client's noise multiplier calibrated to spend epsilon {config.dp_epsilon:g} over every "
                     f"round", self.record_privacy.delta, self.record_privacy.record()["accountant"])
        # one message per client and round: a round's evaluation rides on the next round's training messages,
        # which only reach the same clients when every client trains every round
        self.fuse = getattr(self.transport, "fuses_evaluation", False) and not self.participation.partial

    def sync(self) -> Sync:
        return Sync(self.info["federation"], dict(self.accepted))

    def run(self, start_round: int = 0) -> dict:
        waiting = None
        for rnd in range(start_round, self.config.global_rounds):
            waiting = self.round(rnd, waiting)
        return self.recorder.finish()

    def round(self, rnd: int, waiting: Trained | None = None) -> Trained | None:
        """Train round ``rnd`` (with ``waiting``, the previous round still to be evaluated, in the same messages);
        evaluate it now, or return it when the transport evaluates it with the next round's training."""
        config, method = self.config, self.method
        last = rnd == config.global_rounds - 1
        start = time.perf_counter()
        cohort = self.participation.cohort(rnd, self.transport.available(),
                                           None if self.privacy is None else self.privacy.noisy.secret)
        log.info("round %d/%d%s", rnd + 1, config.global_rounds,
                 f": {len(cohort)} clients sampled" if self.participation.partial else "")
        if not cohort:
            return self.skip(rnd, start)
        instructions = method.configure_train(rnd, cohort)
        if self.privacy is not None:
            self.privacy.begin(rnd)
        if waiting is None:
            updates = self.transport.train(rnd, instructions, self.sync())
        else:
            try:
                evaluations, updates = self.transport.evaluate_then_train(waiting.rnd, waiting.evaluate, rnd,
                                                                          instructions, self.sync())
            except Diverged as exc:  # in process, the previous round was recorded before this one trained
                self.finish(waiting, exc.evaluations, waiting.seconds)
                raise
            self.finish(waiting, evaluations, waiting.seconds)
        # in client order: replies arrive in any order, and a floating-point average depends on its order
        updates = dict(sorted(updates.items()))
        if self.record_privacy is not None:  # every upload that arrived was seen, accepted or not
            self.record_privacy.observe(updates)
        for cid in sorted(set(instructions) - set(updates)):
            log.info("round %d: client %d did not reply; left out of this round", rnd + 1, cid)
        accepted, rejected = self.validator.filter(instructions, updates)
        for cid, reason in sorted(rejected.items()):
            log.info("round %d: rejected the update of client %d: %s", rnd + 1, cid, reason)
        self.accepted.update(dict.fromkeys(accepted, rnd))
        report = method.aggregate_train(rnd, accepted)
        for line in report.log:
            log.info("%s", line)
        # a transport that can lose messages says which arrived (a reply came back); in process, all of them
        delivered = getattr(self.transport, "delivered", None)
        trained = Trained(rnd, report, instructions, accepted, rejected, time.perf_counter() - start,
                          self.evaluations(rnd, cohort), set(instructions if delivered is None else delivered))
        if self.fuse and not last:
            return trained
        self.finish(trained, self.transport.evaluate(rnd, trained.evaluate, self.final_sink(rnd), self.sync()),
                    time.perf_counter() - start)
        return None

    def final_sink(self, rnd: int) -> FinalSink | None:
        """After the last round: save each client's final model as its evaluation arrives."""
        if rnd != self.config.global_rounds - 1:
            return None
        pair_encoding = self.info.get("pair_encoding")
        return lambda cid, layout, state: self.recorder.save_final_model(cid, layout, state, pair_encoding)

    def evaluations(self, rnd: int, cohort: list[int]) -> dict[int, Instruction]:
        """What each client evaluated after round ``rnd`` is evaluated with; after the last round, the newcomers
        too."""
        evaluate = self.method.configure_evaluate(rnd, self.participation.evaluated(rnd, cohort))
        if rnd == self.config.global_rounds - 1 and self.participation.unseen:
            evaluate.update(self.method.configure_newcomers(rnd, self.participation.unseen))
        return evaluate

    def skip(self, rnd: int, start: float) -> None:
        """A round whose sample is empty: nothing is trained or aggregated; the clients due for evaluation (after
        the last round, every client) are evaluated all the same."""
        report = RoundReport("skipped", [f"round {rnd + 1}: sampling drew no client; the round is skipped"])
        log.info("%s", report.log[0])
        evaluate = self.evaluations(rnd, [])
        trained = Trained(rnd, report, {}, {}, {}, time.perf_counter() - start, evaluate, set())
        evaluations = self.transport.evaluate(rnd, evaluate, self.final_sink(rnd), self.sync()) if evaluate else {}
        self.finish(trained, evaluations, time.perf_counter() - start)

    def finish(self, trained: Trained, evaluations: Mapping[int, Evaluation], seconds: float) -> dict:
        """Record an evaluated round and checkpoint it (the last round's final models are saved as they arrive)."""
        rnd, report = trained.rnd, trained.report
        metrics = {cid: e.metrics for cid, e in evaluations.items()}
        if self.privacy is not None:
            spent = self.privacy.charge(rnd)
            self.recorder.history["privacy"] = self.privacy.record()
            log.info("round %d: privacy spent epsilon %.3f at delta %g", rnd + 1, spent, self.privacy.delta)
        if self.record_privacy is not None:
            self.recorder.history["privacy"] = self.record_privacy.record()
            log.info("round %d: privacy per example: the largest epsilon a client spent is %.3f at delta %g",
                     rnd + 1, self.record_privacy.largest(), self.record_privacy.delta)
        last = rnd == self.config.global_rounds - 1
        summary = self.recorder.record_round(rnd, report, trained.instructions, trained.accepted, metrics,
                                             self.method.client_map(), seconds, rejected=trained.rejected,
                                             evaluated_with=trained.evaluate if last else None,
                                             delivered=trained.delivered)
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
        if self.privacy is not None:
            state["privacy"] = self.privacy.state_dict()
        if self.record_privacy is not None:
            state["record_privacy"] = self.record_privacy.state_dict()
        save_checkpoint(self.out, Checkpoint(rnd, self.config.to_dict(), state, stores or {},
                                             self.recorder.history, dict(self.info)))

    def restore(self, ckpt: Checkpoint) -> int:
        """Continue from a checkpoint; return the first round still to run."""
        self.method.load_server_state(ckpt.method_state["method"])
        self.validator.load_state_dict(ckpt.method_state["validator"])
        if self.privacy is not None:
            self.privacy.load_state_dict(ckpt.method_state["privacy"])
        if self.record_privacy is not None:
            self.record_privacy.load_state_dict(ckpt.method_state["record_privacy"])
        self.recorder.history = ckpt.history
        self.info["federation"] = ckpt.info.get("federation", self.info["federation"])
        # where and how each later session ran (device, precision, ...): the history's own keys are the first's
        resumed = {key: value for key, value in self.info.items() if key != "federation"}
        self.recorder.history.setdefault("resumed", []).append({"after_round": ckpt.round + 1, **resumed})
        if "accepted" in ckpt.method_state:
            self.accepted = {int(cid): int(r) for cid, r in ckpt.method_state["accepted"].items()}
        else:  # a checkpoint from before accepted rounds were kept: every store was as of the last round
            self.accepted = dict.fromkeys((c.client_id for c in self.method.clients), ckpt.round)
        return ckpt.round + 1
