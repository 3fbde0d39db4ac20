"""The Flower ServerApp: the shared round loop (``fedlease.runtime.loop``) with Flower messages as transport.

The server half of the method, the update checks, the artifacts and the checkpoints are exactly those of the
in-process runner; only the transport differs. Clients are identified by their partition id, which each
SuperNode reports when asked (node ids change whenever a node restarts), so a node that comes back rejoins
as the same client. A node that fails or does not answer within ``round-timeout`` is left out of the round
and logged; a cluster with no reply keeps its expert; the run goes on.

With sampling (``clients-per-round``, ``sample-rate``) the server does not wait for every node: it starts once
as many nodes as a round asks for have connected (or after ``wait-nodes-timeout``), and each round's cohort is
drawn from the nodes connected at that moment, so a node that joins later (after the allocation, say) is sampled
from then on, and placed by its signature when it first trains.

Differential privacy runs here as in process, with one addition: the server keeps each client-level DP aggregate
as a noised change against what the clients started from, and for an aggregate no client has downloaded yet that
is the seeded initial state, which the server, loading no model, asks of a node (``query.initial``: public, the
run's seed and the public model make it).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedlease.config import RunConfig
from fedlease.errors import FedleaseError
from fedlease.methods import create_method
from fedlease.methods.base import Instruction, Update, select
from fedlease.privacy import enabled
from fedlease.report.artifacts import RunRecorder
from fedlease.runtime.checkpoint import load_checkpoint
from fedlease.runtime.clients import client_infos
from fedlease.runtime.flower import secure
from fedlease.runtime.flower.messages import (
    DIVERGED_CODE,
    STATE_LOST,
    decode_diverged,
    decode_evaluation,
    decode_failure,
    decode_update,
    decode_update_evaluation,
    encode_instruction,
    get_state,
)
from fedlease.runtime.flower.run_config import from_run_config
from fedlease.runtime.loop import Diverged, Evaluation, Federation, FinalSink, Sync
from fedlease.runtime.participation import Participation
from fedlease.runtime.simulation import (
    check_output_dir,
    create_output_dir,
    logging_to,
    prepare_config,
    refuse_changes,
)

app = ServerApp()
log = logging.getLogger("fedlease")

POLL_SECONDS = 0.1  # replies
DISCOVERY_SECONDS = 1.0  # new nodes, while waiting for the run's clients or for a client's restarted node


class FlowerTransport:
    """Sends the method's instructions to the SuperNodes and collects their replies."""

    # a round's evaluation travels with the next round's training message: one message per client and round,
    # since each message after a node's first waits for the SuperNode's idle poll (up to 3 s)
    fuses_evaluation = True

    def __init__(self, grid: Grid, config: RunConfig, round_timeout: float, allow_mixed_precision: bool = False,
                 on_node=None, rejoin_timeout: float = 60.0) -> None:
        self.grid = grid
        self.config = config
        self.participation = Participation(config)
        self.round_timeout = round_timeout
        self.rejoin_timeout = rejoin_timeout
        self.allow_mixed_precision = allow_mixed_precision
        self.nodes: dict[int, dict[str, str]] = {}  # client -> its node's device, precision and versions
        self.precision: str | None = None  # the run's precision: the first node's
        self.on_node = on_node or (lambda cid, described: None)
        self.node_of: dict[int, int] = {}  # client (partition) id -> node id
        self.claims: dict[int, int] = {}  # node id -> the client it reported being; each node is asked once
        self.round_trip: dict[int, float] = {}  # the last exchange: seconds from sending to each reply
        # the clients whose node answered the last round's message (a reply or an error): it reached them
        self.delivered: set[int] = set()
        self.diverged: dict[int, str] = {}  # the last round's clients whose training diverged: why

    def exchange(self, messages: Mapping[int, Message], timeout: float, follow: bool = False
                 ) -> dict[int, Message]:
        """Send one message per key; return the successful replies by key (errors are logged, not returned).

        Replies are polled every ``POLL_SECONDS`` (``Grid.send_and_receive`` polls every 3 s); the time each took
        is kept in ``self.round_trip``. With ``follow`` (keys are clients), a client whose node went away (no
        reply yet, or Flower's "node unavailable") and came back as a new node within the timeout, or within
        ``rejoin_timeout`` of the node-unavailable reply, gets the same message again on its new node: its own
        state is where the server last accepted it, so the round goes on as if the node had never stopped."""
        start = time.monotonic()
        key_of: dict[str, int] = {}
        sent_to: dict[int, int] = {}  # key -> node the pending message went to
        lost_at: dict[int, float] = {}  # key -> when Flower reported its node unavailable
        answered: dict[int, Message] = {}
        trips: dict[int, float] = {}

        def push(batch: Mapping[int, Message]) -> None:
            items = list(batch.items())
            ids = list(self.grid.push_messages([m for _, m in items]))
            for mid, (key, message) in zip(ids, items, strict=False):
                if mid is not None:
                    key_of[mid] = key
                    sent_to[key] = message.metadata.dst_node_id
            for key in sorted(set(batch) - set(key_of.values())):
                log.info("the message to client %s could not be pushed to the SuperLink", key)

        if follow:
            self.diverged = {}
        push(messages)
        waiting = set(key_of)
        checked = start
        while waiting:
            for reply in self.grid.pull_messages(list(waiting)):
                message_id = reply.metadata.reply_to_message_id
                key = key_of.get(message_id)
                waiting.discard(message_id)
                if key is None:
                    continue
                if follow and reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:  # node lost
                    lost_at.setdefault(key, time.monotonic())
                    continue
                trips[key] = time.monotonic() - start
                if follow and reply.has_error() and reply.error.code == DIVERGED_CODE:
                    self.diverged[key] = reply.error.reason
                elif reply.has_error():
                    log.info("%s answered with error %s: %s", f"node of client {key}" if follow else f"node {key}",
                             reply.error.code, reply.error.reason)
                else:
                    answered[key] = reply
            now = time.monotonic()
            pending = {key for key in sent_to if key not in trips}
            if follow and pending and now - checked >= DISCOVERY_SECONDS:
                checked = now
                self.discover(self.grid.get_node_ids())
                moved = {key: messages[key] for key in pending if self.node_of.get(key, sent_to[key]) != sent_to[key]}
                for key in sorted(moved):
                    log.info("client %d is back on node %d: its message is sent again", key, self.node_of[key])
                    lost_at.pop(key, None)
                    for mid in [mid for mid, k in key_of.items() if k == key]:
                        del key_of[mid]
                        waiting.discard(mid)
                if moved:
                    before = set(key_of)
                    push({key: resend(m, self.node_of[key]) for key, m in moved.items()})
                    waiting |= set(key_of) - before
            given_up = {key for key, when in lost_at.items() if now - when > self.rejoin_timeout}
            if not waiting and not (set(lost_at) - given_up) or now - start > timeout:
                break
            time.sleep(POLL_SECONDS)
        for key in sorted(set(lost_at) - set(trips)):
            log.info("the node of client %d became unavailable and did not come back in time", key)
        if follow:
            self.round_trip = trips
            self.delivered = set(trips)
        return answered

    def discover(self, node_ids: Iterable[int]) -> None:
        """Ask nodes not seen before which client they are; forget nodes that are gone. Each node is asked once:
        where two live nodes report one client (a restart that overlaps the old process, a duplicated
        partition-id), the client moves to the newer once, and back to the other only if the newer leaves."""
        node_ids = set(node_ids)
        self.node_of = {cid: nid for cid, nid in self.node_of.items() if nid in node_ids}
        self.claims = {nid: cid for nid, cid in self.claims.items() if nid in node_ids}
        for nid, cid in sorted(self.claims.items(), reverse=True):  # a client whose node left: another claimant
            if cid not in self.node_of:
                log.info("client %d is now on node %d, which also reported it", cid, nid)
                self.node_of[cid] = nid
        new = node_ids - set(self.node_of.values()) - set(self.claims)
        if not new:
            return
        queries = {nid: Message(RecordDict(), dst_node_id=nid, message_type="query.partition") for nid in new}
        for nid, reply in self.exchange(queries, timeout=self.round_timeout).items():
            cid = int(reply.content["info"]["partition-id"])
            if not 0 <= cid < self.config.num_clients:
                log.info("node %d reports partition-id %d, outside this run's %d clients; ignored",
                         nid, cid, self.config.num_clients)
                continue
            described = dict(reply.content["node"]) if "node" in reply.content else {}
            known = cid in self.nodes
            if not self.accept_node(cid, nid, described):
                continue
            self.claims[nid] = cid
            if cid in self.node_of:  # a restarted node: the old one may not be marked offline yet
                log.info("client %d is now on node %d (was node %d)", cid, nid, self.node_of[cid])
            elif known:
                log.info("client %d rejoined on node %d", cid, nid)
            self.node_of[cid] = nid

    def accept_node(self, cid: int, nid: int, described: dict[str, str]) -> bool:
        """Record the node's device, precision and versions; refuse a precision other than the run's (the first
        node's) unless allow-mixed-precision is set."""
        precision = described.get("precision")
        if self.precision is None:
            self.precision = precision
        elif precision != self.precision and not self.allow_mixed_precision:
            log.info("node %d of client %d trains in %s, but this run trains in %s; ignored (run-config "
                     "allow-mixed-precision=true accepts it)", nid, cid, precision, self.precision)
            return False
        if described != self.nodes.get(cid):
            log.info("client %d on node %d: %s", cid, nid, ", ".join(f"{k} {v}" for k, v in described.items()))
            self.nodes[cid] = described
            self.on_node(cid, described)
        return True

    def wait_for_clients(self, timeout: float) -> None:
        """Wait for every client's node, or with sampling for as many trainable clients as a round asks for (all of
        them with --sample_rate, whose cohort is drawn from every trainable client)."""
        deadline = time.monotonic() + timeout
        wanted = self.config.clients_per_round or self.config.num_clients
        while True:
            self.discover(self.grid.get_node_ids())
            if len(self.node_of) >= wanted or time.monotonic() > deadline:
                break
            time.sleep(DISCOVERY_SECONDS)
        missing = sorted(set(range(self.config.num_clients)) - set(self.node_of))
        if missing:
            log.info("starting without clients %s: no SuperNode reported them%s", missing,
                     " yet" if self.participation.partial else f" within {timeout:.0f}s")

    def available(self) -> list[int] | None:
        """With sampling, the clients whose node is connected now (each round's cohort is drawn from them); in a
        closed federation every client (an absent one is logged as not replying)."""
        if not self.participation.partial:
            return None
        self.discover(self.grid.get_node_ids())
        return sorted(self.node_of)

    def initial_state(self, seed: int) -> dict[str, torch.Tensor]:
        """The seeded initial LoRA and head (``AdaptedModel.initial_state``), asked of a connected node: under
        differential privacy, the reference of an aggregate no client has downloaded yet. Public (the seed and
        the public model make it), so any node may answer; the next is asked where one does not, or answers
        with an unreadable, empty or non-finite state. A state of other arrays than the uploads' stops the first
        aggregate (``NoisyMean.mean``)."""
        self.discover(self.grid.get_node_ids())
        # the nodes that answered the last message first: a straggler still training would keep the query waiting
        for cid, nid in sorted(self.node_of.items(), key=lambda item: (item[0] not in self.delivered, item[0])):
            query = Message(RecordDict({"config": ConfigRecord({"seed": int(seed)})}), dst_node_id=nid,
                            message_type="query.initial")
            reply = self.exchange({cid: query}, timeout=self.round_timeout).get(cid)
            if reply is None:
                continue
            try:
                state = get_state(reply.content, "state")
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                log.warning("client %d's node sent an unreadable initial state (%s); asking the next node", cid, err)
                continue
            if not state or not all(torch.is_floating_point(t) and bool(torch.isfinite(t).all())
                                    for t in state.values()):
                log.warning("client %d's node sent an initial state that is empty or not finite; asking the next node",
                            cid)
                continue
            return state
        raise FedleaseError("no node answered the query for the seeded initial state, which differential privacy "
                            "needs as the reference of the first aggregates; see the nodes' logs")

    def send(self, rnd: int, message_type: str, instructions: Mapping[int, Instruction], sync: Sync,
             final: bool = False, evaluate_first: tuple[int, Mapping[int, Instruction]] | None = None
             ) -> dict[int, Message]:
        self.discover(self.grid.get_node_ids())  # nodes that left or (re)joined since the last round
        evaluated, before = evaluate_first or (None, {})
        messages = {cid: Message(encode_instruction(ins, rnd, final, sync.federation, sync.of(cid),
                                                    (evaluated, before[cid]) if cid in before else None),
                                 dst_node_id=self.node_of[cid], message_type=message_type, group_id=str(rnd))
                    for cid, ins in instructions.items() if cid in self.node_of}
        return self.exchange(messages, timeout=self.round_timeout, follow=True)

    @staticmethod
    def note_lost_state(cid: int, metrics: dict, sync: Sync) -> None:
        if metrics.pop(STATE_LOST, 0):
            log.info("client %d: its node no longer held its own state of round %d; it continued from the initial "
                     "state (give each SuperNode a state-dir to keep it across restarts)", cid, sync.of(cid) + 1)

    def train(self, rnd: int, instructions: Mapping[int, Instruction], sync: Sync) -> dict[int, Update]:
        return self.evaluate_then_train(None, {}, rnd, instructions, sync)[1]

    def evaluate_then_train(self, evaluated: int | None, evaluations: Mapping[int, Instruction], rnd: int,
                            instructions: Mapping[int, Instruction], sync: Sync
                            ) -> tuple[dict[int, Evaluation], dict[int, Update]]:
        """Train round ``rnd``; each client first evaluates round ``evaluated`` with its ``evaluations`` entry. A
        client whose training diverged stops the run (``Diverged``, carrying the evaluations that arrived)."""
        results, updates = {}, {}
        first = (evaluated, evaluations) if evaluations else None
        replies = self.send(rnd, "train", instructions, sync, evaluate_first=first)
        diverged = dict(self.diverged)
        for cid, reply in replies.items():
            if (reason := decode_failure(reply.content, "training-error")) is not None:
                metrics = decode_update_evaluation(reply.content)
                if int(reply.content["metrics"]["partition-id"]) == cid and metrics is not None:
                    results[cid] = Evaluation(metrics)
                if decode_diverged(reply.content):
                    diverged[cid] = reason
                    continue
                log.info("client %d could not train round %d on its node (%s); its evaluation of round %d is kept",
                         cid, rnd + 1, reason, evaluated + 1)
                continue
            sender, update = decode_update(reply.content)
            if sender == cid:
                self.note_lost_state(cid, update.metrics, sync)
                update.metrics["round_trip_seconds"] = round(self.round_trip[cid], 3)  # send to reply, server clock
                updates[cid] = update
                if (metrics := decode_update_evaluation(reply.content)) is not None:
                    results[cid] = Evaluation(metrics)
                if (reason := decode_failure(reply.content, "evaluation-error")) is not None:
                    log.info("client %d could not evaluate round %d on its node (%s); its update of round %d is "
                             "used", cid, evaluated + 1, reason, rnd + 1)
        if diverged:
            raise Diverged(f"round {rnd + 1}, {diverged[min(diverged)]}", results)
        return results, updates

    def evaluate(self, rnd: int, instructions: Mapping[int, Instruction], final: FinalSink | None, sync: Sync
                 ) -> dict[int, Evaluation]:
        evaluations = {}
        for cid, reply in self.send(rnd, "evaluate", instructions, sync, final is not None).items():
            sender, evaluation = decode_evaluation(reply.content)
            if sender == cid:
                if final is not None and evaluation.final is not None:
                    final(cid, *evaluation.final)
                evaluations[cid] = Evaluation(evaluation.metrics)
        return evaluations

    def client_stores(self, sync: Sync) -> None:
        return None  # each client's store lives on its own node


class SecureTransport(FlowerTransport):
    """Training rounds through Flower's SecAgg+ wherever the method's round is a set of sums over known groups of
    clients (``FederatedMethod.secure_slots``; ``fedlease.runtime.flower.secure``): the server gets each slot's
    sum, never a client's upload, and hands every participant its slots' averages as its update. Other rounds
    (FedLEASE's warmup, a round in which clients place themselves) train in the clear, logged."""

    def __init__(self, grid: Grid, config: RunConfig, round_timeout: float, allow_mixed_precision: bool = False,
                 on_node=None, rejoin_timeout: float = 60.0, method=None, context: Context | None = None) -> None:
        super().__init__(grid, config, round_timeout, allow_mixed_precision, on_node, rejoin_timeout)
        self.method = method
        self.context = context
        self.schemas: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}  # slot -> tensor -> (shape, dtype)

    def evaluate_then_train(self, evaluated: int | None, evaluations: Mapping[int, Instruction], rnd: int,
                            instructions: Mapping[int, Instruction], sync: Sync
                            ) -> tuple[dict[int, Evaluation], dict[int, Update]]:
        plan = self.method.secure_slots(rnd, instructions)
        if isinstance(plan, str):
            log.info("round %d is trained without secure aggregation: %s", rnd + 1, plan)
            return super().evaluate_then_train(evaluated, evaluations, rnd, instructions, sync)
        return self.secure_round(evaluated, evaluations, rnd, instructions, sync, plan)

    def slot_layout(self, plan: Mapping[int, Mapping[str, tuple[str, ...]]], instructions: Mapping[int, Instruction]
                    ) -> list[secure.Slot] | None:
        """The round's slots; a slot whose tensors the server has not seen yet is asked of one of its members
        (names, shapes and dtypes: the server loads no model)."""
        wanted = {slot for own in plan.values() for slot in own}
        unknown, ask = wanted - set(self.schemas), {}
        for cid in sorted(plan):
            if set(plan[cid]) & (unknown - {s for c in ask for s in plan[c]}):
                ask[cid] = self.node_of[cid]
        if ask:
            queries = {nid: Message(secure.schema_query(instructions[cid]), dst_node_id=nid,
                                    message_type=f"query.{secure.SCHEMA}") for cid, nid in ask.items()}
            replies = self.exchange(queries, timeout=self.round_timeout)
            for cid, nid in ask.items():
                if nid not in replies:
                    continue
                tensors = json.loads(str(replies[nid].content["schema"]["tensors"]))
                for slot, parts in plan[cid].items():
                    self.schemas.setdefault(slot, {k: (tuple(v[0]), v[1]) for k, v in select(tensors, parts).items()})
        if missing := sorted(wanted - set(self.schemas)):
            log.info("no member of slot %s told its tensors' shapes", missing[0])
            return None
        return secure.build_layout({slot: self.schemas[slot] for slot in wanted})

    def secure_round(self, evaluated: int | None, evaluations: Mapping[int, Instruction], rnd: int,
                     instructions: Mapping[int, Instruction], sync: Sync,
                     plan: Mapping[int, Mapping[str, tuple[str, ...]]]
                     ) -> tuple[dict[int, Evaluation], dict[int, Update]]:
        self.discover(self.grid.get_node_ids())
        reachable = sorted(cid for cid in instructions if cid in self.node_of)
        self.diverged, self.delivered, self.round_trip = {}, set(), {}
        plan = {cid: plan[cid] for cid in reachable}
        slots = self.slot_layout(plan, instructions) if len(reachable) >= secure.MIN_CLIENTS else None
        if slots is None:
            log.info("round %d: %d clients reachable; secure aggregation needs %d that answer: nothing is aggregated",
                     rnd + 1, len(reachable), secure.MIN_CLIENTS)
            return {}, {}
        bound = secure.weight_bound(self.config)
        client_of, contents = {}, {}
        for cid in reachable:
            first = (evaluated, evaluations[cid]) if cid in evaluations else None
            content = encode_instruction(instructions[cid], rnd, False, sync.federation, sync.of(cid), first)
            contents[self.node_of[cid]] = secure.secure_message(content, slots, plan[cid], bound)
            client_of[self.node_of[cid]] = cid
        start = time.monotonic()
        total, results, failures, fast = secure.run_secure_round(self.grid, self.context, rnd, contents,
                                                                 self.round_timeout)
        seconds = round(time.monotonic() - start, 3)
        diverged = []
        for error in failures:
            code, reason = secure.describe_error(error)
            if code == DIVERGED_CODE:
                diverged.append(reason)
            else:
                log.info("round %d: a node left secure aggregation: error %s: %s", rnd + 1, code, reason)
        answers, scores = {}, {}
        for nid, fitres in results:
            cid, metrics = client_of.get(nid), dict(fitres.metrics)
            if cid is None or int(metrics.pop("partition-id", -1)) != cid:
                continue
            self.delivered.add(cid)
            self.round_trip[cid] = seconds
            if (score := {k.removeprefix("evaluation."): float(v) for k, v in metrics.items()
                          if k.startswith("evaluation.")}):
                scores[cid] = Evaluation(score)
            if (reason := metrics.pop("evaluation-error", None)) is not None:
                log.info("client %d could not evaluate round %d on its node (%s)", cid, evaluated + 1, reason)
            metrics = {k: float(v) for k, v in metrics.items() if not k.startswith("evaluation.")}
            self.note_lost_state(cid, metrics, sync)
            metrics.update(round_trip_seconds=seconds, secure_upload_bytes=float(fast.masked_bytes.get(nid, 0)),
                           secure_upload_params=float(secure.layout_length(slots) + 1))
            answers[cid] = metrics
        if diverged:
            raise Diverged(f"round {rnd + 1}, {diverged[0]}", scores)
        if total is None:
            log.info("round %d: secure aggregation did not complete (%d of %d clients sent a masked vector; SecAgg+ "
                     "needs %d): nothing is aggregated", rnd + 1, len(answers), len(contents),
                     secure.threshold(len(contents)))
            return scores, {}
        secure.audit(rnd, "sum", {"sum": total})
        averages = secure.unpack(total, slots, {slot for cid in answers for slot in plan[cid]})
        updates = {}
        for cid, metrics in sorted(answers.items()):
            if not all(slot in averages for slot in plan[cid]):
                continue
            state = {key: value for slot in plan[cid] for key, value in averages[slot][0].items()}
            updates[cid] = Update(state, 1, metrics)
        for slot in sorted(averages):
            members = [cid for cid in updates if slot in plan[cid]]
            log.info("round %d: secure sum of %s over %d client(s)%s", rnd + 1, slot, len(members),
                     ": the server learns that client's own upload" if len(members) == 1 else "")
        secure.audit(rnd, "updates", {f"{cid}/{key}": value.numpy() for cid, u in updates.items()
                                      for key, value in u.state.items()})
        return scores, updates


def resend(message: Message, node_id: int) -> Message:
    """The same instruction for the client's new node."""
    return Message(message.content, dst_node_id=node_id, message_type=message.metadata.message_type,
                   group_id=message.metadata.group_id)


def log_to_flower() -> None:
    """Send the run's log through Flower's own logger, so `flwr run --stream` and `flwr log` show it."""
    flower = logging.getLogger("flwr")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in flower.handlers:
        if handler not in log.handlers:
            log.addHandler(handler)


@app.main()
def main(grid: Grid, context: Context) -> None:
    log_to_flower()
    config, runtime = from_run_config(context.run_config)
    config = prepare_config(config)
    if runtime["secure-aggregation"]:
        secure.refuse(config)
    out = Path(config.output_dir).expanduser()
    ckpt = load_checkpoint(out) if runtime["resume"] else None
    if ckpt is None:
        check_output_dir(config)
        create_output_dir(out)
    else:  # every node would rebuild its data and training from new settings: not the run being continued
        refuse_changes(out, RunConfig.from_dict(ckpt.config), config.to_dict())
    with logging_to(out / "training_log.txt"):
        log.info("fedlease %s on Flower: %d clients (%s), %d rounds, output %s", config.method, config.num_clients,
                 " ".join(config.tasks), config.global_rounds, out)
        infos = client_infos(config)
        method = create_method(config, infos)
        info = {"model_source": config.model_name, "runtime": "flower"}
        recorder = RunRecorder(out, config, infos, info, Participation(config).unseen)
        recorder.describe_clients([{"client_id": c.client_id, "task": c.task, "labels": list(c.labels)}
                                   for c in infos])
        options = (grid, config, float(runtime["round-timeout"]), bool(runtime["allow-mixed-precision"]),
                   recorder.describe_node, float(runtime["rejoin-timeout"]))
        if runtime["secure-aggregation"]:
            log.info("secure aggregation: Flower's SecAgg+ wherever a round's aggregate is a set of sums")
            transport = SecureTransport(*options, method=method, context=context)
        else:
            transport = FlowerTransport(*options)
        method.initial = transport.initial_state  # public: the reference of DP's first aggregates
        federation = Federation(config, method, transport, recorder, out, info)
        start = federation.restore(ckpt) if ckpt is not None else 0  # first: the nodes below join its history
        transport.wait_for_clients(float(runtime["wait-nodes-timeout"]))
        if enabled(config):  # the reference of DP's first aggregates, asked before round 1, not amid one
            method.initial_parts(())
        if ckpt is not None:
            log.info("resuming after round %d; each client's own state is taken back, on its node, to the last "
                     "update of it this checkpoint accepted", ckpt.round + 1)
        try:
            federation.run(start)
        except Diverged as exc:  # no command line prints it here: the run's log says why it stopped
            log.error("fedlease: error: %s", exc)
            raise
        log.info("finished: %s", out / "results.md")
