"""An in-process Flower Grid for tests: the real ServerApp and ClientApp objects and the real message records,
delivered synchronously to virtual nodes, with no Ray and no sockets.

Each virtual node has its own Context (node config with its partition id and any ``node_config`` given for it,
a ``state`` that persists across the run). ``fail`` makes nodes go silent for given rounds, and a node that
comes back gets a new node id and an empty ``state``, as a restarted SuperNode does (a ``state-dir`` in its node
config survives, as a folder on a real node does). ``restart`` empties a node's ``state`` before given rounds,
without a missed message; ``late`` drops a node's training reply in given rounds after the client has trained
(a reply that missed the timeout); ``crash`` kills a node while it trains in given rounds and restarts it at
once (no reply, a new node id, an empty ``state``). ``fail`` answers "node unavailable" for the whole round.
``extra_nodes`` adds nodes with other partition ids. ``appear`` keeps a node out of the node list until the round
it connects in (a client that first shows up late).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity  # internal: building a Message needs a task identity

from fedlease.errors import describe


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict,
                 fail: dict[int, set[int]] | None = None, node_config: dict[int, dict] | None = None,
                 extra_nodes: Iterable[int] = (), restart: dict[int, set[int]] | None = None,
                 late: dict[int, set[int]] | None = None, crash: dict[int, set[int]] | None = None,
                 appear: dict[int, int] | None = None) -> None:
        self.client_app = client_app
        self.run_config = dict(run_config)
        self._run = Run.create_empty(run_id=1)
        self.fail = fail or {}  # partition id -> rounds (0-based group ids) in which it does not answer
        self.node_config = node_config or {}  # partition id -> extra node config (state-dir, data-dir)
        self.restart = {pid: set(r) for pid, r in (restart or {}).items()}  # restarted before these rounds' training
        self.late = late or {}  # partition id -> rounds whose training reply arrives after the round's timeout
        self.crash = {pid: set(r) for pid, r in (crash or {}).items()}  # dies on its training message, restarts
        self.down: dict[int, int] = {}  # node id -> the round it is down for (it answers "node unavailable")
        self.appear = appear or {}  # partition id -> the round (0-based) from which its node is connected
        self.round = 0  # the latest round a message was sent for
        self.nodes: dict[int, Context] = {}
        self.next_node_id = 100
        self.replies: dict[str, Message] = {}
        for pid in [*range(num_nodes), *extra_nodes]:
            self.add_node(pid)

    def add_node(self, partition_id: int) -> None:
        config = {"partition-id": partition_id, **self.node_config.get(partition_id, {})}
        self.nodes[self.next_node_id] = Context(run_id=1, node_id=self.next_node_id, node_config=config,
                                                state=RecordDict(), run_config=self.run_config)
        self.next_node_id += 1

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [nid for nid, context in self.nodes.items()
                if self.appear.get(context.node_config["partition-id"], 0) <= self.round]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            context = self.nodes.get(msg.metadata.dst_node_id)
            if context is None:
                continue
            pid = context.node_config["partition-id"]
            group = msg.metadata.group_id
            rnd = int(group) if group.isdigit() else None
            self.round = max(self.round, rnd or 0)
            if rnd in self.fail.get(pid, set()) and self.down.get(msg.metadata.dst_node_id) != rnd:
                # the node dies: Flower answers "node unavailable"; it comes back as a new node with an empty
                # state, which is still down for the rest of this round
                del self.nodes[msg.metadata.dst_node_id]
                self.add_node(pid)
                self.down[self.next_node_id - 1] = rnd
                self.replies[msg.metadata.message_id] = unavailable(msg)
                continue
            if msg.metadata.dst_node_id in self.down and self.down[msg.metadata.dst_node_id] == rnd:
                self.replies[msg.metadata.message_id] = unavailable(msg)
                continue
            if rnd in self.crash.get(pid, set()) and msg.metadata.message_type == "train":
                # the node dies while training and restarts at once: no reply, a new node id, an empty state
                self.crash[pid].discard(rnd)
                del self.nodes[msg.metadata.dst_node_id]
                self.add_node(pid)
                continue
            if rnd in self.restart.get(pid, set()):  # the node restarted since its last message: state emptied
                self.restart[pid].discard(rnd)
                context.state = RecordDict()
            try:
                reply = self.client_app(msg, context)
            except Exception as exc:  # as a SuperNode reports a ClientApp exception
                reply = Message(Error(code=2, reason=describe(exc)), reply_to=msg)
            if rnd in self.late.get(pid, set()) and msg.metadata.message_type == "train":
                continue  # the client trained, but its reply came too late: the server never sees it
            self.replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(list(messages)))


def unavailable(msg: Message) -> Message:
    return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node unavailable"), reply_to=msg)


def run_server(server_app: ServerApp, grid: InProcessGrid) -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    server_app(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=grid.run_config))
