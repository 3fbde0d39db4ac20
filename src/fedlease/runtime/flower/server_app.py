"""The Flower ServerApp: the shared round loop (``fedlease.runtime.loop``) with Flower messages as transport.

The server half of the method, the update checks, the artifacts and the checkpoints are exactly those of the
in-process runner; only the transport differs. Clients are identified by their partition id, which each
SuperNode reports when asked (node ids change whenever a node restarts), so a node that comes back rejoins
as the same client. A node that fails or does not answer within ``round-timeout`` is left out of the round
and logged; a cluster with no reply keeps its expert; the run goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlease.config import RunConfig
from fedlease.methods import create_method
from fedlease.methods.base import Instruction, Update
from fedlease.report.artifacts import RunRecorder
from fedlease.runtime.checkpoint import load_checkpoint
from fedlease.runtime.clients import client_infos
from fedlease.runtime.flower.messages import decode_evaluation, decode_update, encode_instruction
from fedlease.runtime.flower.run_config import from_run_config
from fedlease.runtime.loop import Evaluation, Federation
from fedlease.runtime.simulation import check_output_dir, create_output_dir, logging_to, prepare_config

app = ServerApp()
log = logging.getLogger("fedlease")

POLL_SECONDS = 1.0


class FlowerTransport:
    """Sends the method's instructions to the SuperNodes and collects their replies."""

    def __init__(self, grid: Grid, config: RunConfig, round_timeout: float) -> None:
        self.grid = grid
        self.config = config
        self.round_timeout = round_timeout
        self.node_of: dict[int, int] = {}  # client (partition) id -> node id

    def exchange(self, messages: Mapping[int, Message], timeout: float) -> dict[int, Message]:
        """Send one message per key; return the successful replies by key (errors are logged, not returned)."""
        sent = list(messages.items())
        replies = self.grid.send_and_receive([m for _, m in sent], timeout=timeout)
        key_of = {m.metadata.message_id: key for key, m in sent}
        answered: dict[int, Message] = {}
        for reply in replies:
            key = key_of.get(reply.metadata.reply_to_message_id)
            if key is None:
                continue
            if reply.has_error():
                log.info("node of client %s answered with error %s: %s", key, reply.error.code, reply.error.reason)
            else:
                answered[key] = reply
        return answered

    def discover(self, node_ids: Iterable[int]) -> None:
        """Ask nodes not seen before which client they are; forget nodes that are gone."""
        node_ids = set(node_ids)
        self.node_of = {cid: nid for cid, nid in self.node_of.items() if nid in node_ids}
        new = node_ids - set(self.node_of.values())
        if not new:
            return
        queries = {nid: Message(RecordDict(), dst_node_id=nid, message_type="query.partition") for nid in new}
        for nid, reply in self.exchange(queries, timeout=self.round_timeout).items():
            cid = int(reply.content["info"]["partition-id"])
            if 0 <= cid < self.config.num_clients:
                if cid in self.node_of:  # a restarted node: the old one may not be marked offline yet
                    log.info("client %d is now on node %d (was node %d)", cid, nid, self.node_of[cid])
                self.node_of[cid] = nid
            else:
                log.info("node %d reports partition-id %d, outside this run's %d clients; ignored",
                         nid, cid, self.config.num_clients)

    def wait_for_clients(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.discover(self.grid.get_node_ids())
            if len(self.node_of) == self.config.num_clients or time.monotonic() > deadline:
                break
            time.sleep(POLL_SECONDS)
        missing = sorted(set(range(self.config.num_clients)) - set(self.node_of))
        if missing:
            log.info("starting without clients %s: no SuperNode reported them within %.0fs", missing, timeout)

    def send(self, rnd: int, message_type: str, instructions: Mapping[int, Instruction], final: bool = False
             ) -> dict[int, Message]:
        self.discover(self.grid.get_node_ids())  # nodes that left or (re)joined since the last round
        messages = {cid: Message(encode_instruction(ins, rnd, final), dst_node_id=self.node_of[cid],
                                 message_type=message_type, group_id=str(rnd))
                    for cid, ins in instructions.items() if cid in self.node_of}
        return self.exchange(messages, timeout=self.round_timeout)

    def train(self, rnd: int, instructions: Mapping[int, Instruction]) -> dict[int, Update]:
        updates = {}
        for cid, reply in self.send(rnd, "train", instructions).items():
            sender, update = decode_update(reply.content)
            if sender == cid:
                updates[cid] = update
        return updates

    def evaluate(self, rnd: int, instructions: Mapping[int, Instruction], final: bool) -> dict[int, Evaluation]:
        evaluations = {}
        for cid, reply in self.send(rnd, "evaluate", instructions, final).items():
            sender, evaluation = decode_evaluation(reply.content)
            if sender == cid:
                evaluations[cid] = evaluation
        return evaluations

    def client_stores(self) -> None:
        return None  # each client's store lives on its own node


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
    out = Path(config.output_dir).expanduser()
    ckpt = load_checkpoint(out) if runtime["resume"] else None
    if ckpt is None:
        check_output_dir(config)
        create_output_dir(out)
    with logging_to(out / "training_log.txt"):
        log.info("fedlease %s on Flower: %d clients (%s), %d rounds, output %s", config.method, config.num_clients,
                 " ".join(config.tasks), config.global_rounds, out)
        infos = client_infos(config)
        method = create_method(config, infos)
        info = {"model_source": config.model_name, "runtime": "flower"}
        recorder = RunRecorder(out, config, infos, info)
        recorder.describe_clients([{"client_id": c.client_id, "task": c.task, "labels": list(c.labels)}
                                   for c in infos])
        transport = FlowerTransport(grid, config, float(runtime["round-timeout"]))
        transport.wait_for_clients(float(runtime["wait-nodes-timeout"]))
        federation = Federation(config, method, transport, recorder, out, info)
        start = federation.restore(ckpt) if ckpt is not None else 0
        if ckpt is not None:
            log.info("resuming after round %d (each client's own store restarts on its node)", ckpt.round + 1)
        federation.run(start)
        log.info("finished: %s", out / "results.md")
