"""``fedlease executor``: one long-lived process that runs a SuperNode's ClientApp tasks, so the model is loaded
once per node and run instead of once per message.

Flower (1.42) runs every message a SuperNode receives as a task in a new ``flwr-clientapp`` process, whichever
isolation mode is used; a process never serves a second task (its Runtime API token is single-use and it ends
with ``flwr_exit``), and Flower's prestarted task workers do not cover ClientApps. With a 1.4 GB backbone that
is a model load per message per client (flwrlabs/flower#3670 asks for a ClientApp that stays loaded).

This executor takes the place of ``flower-superexec`` next to ``flower-supernode --isolation process``. It asks
the node's Runtime API for ClientApp tasks (``AcquireTask``) and runs each one in this process with the same
steps as ``flwr-clientapp`` (pull the message and context, install the app bundle, load the ClientApp, push
the reply and the context back, a heartbeat meanwhile), but without exiting: the imported ClientApp module,
and the model and data it caches per run (``client_app.session_for``), stay for the next message. An exception
in a task becomes an error reply, as in ``flwr-clientapp``, and the executor goes on.

It uses Flower's Runtime API client and its task helpers from ``flwr.supernode.runtime.run_clientapp``
(the message is pulled as Flower pulls it, with a shorter back-off: see ``pull_task_input``), which are not a
public API: ``flwr`` is pinned to the releases the tests pass on (pyproject), and
``fedlease deploy --executor flower`` keeps Flower's own per-message processes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

from fedlease.errors import describe

log = logging.getLogger("fedlease")

POLL_SECONDS = 0.05
# The SuperNode makes a task acquirable before it has pulled the message's objects from the SuperLink; Flower's
# own pull then waits 1 s, 2 s, ... for them (measured: 1 s in half of the messages of a loopback run).
# The objects arrive within milliseconds, so this executor asks again sooner.
PULL_BACKOFF_SECONDS, PULL_BACKOFF_CAP_SECONDS = 0.02, 0.5
RUNNING = threading.Event()  # a task is running (SIGINT then aborts the task, not the executor)


def pull_task_input(client):
    """``flwr.supernode.runtime.run_clientapp.pull_task_input`` with a short back-off for the message's objects."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=PULL_BACKOFF_SECONDS, backoff_cap=PULL_BACKOFF_CAP_SECONDS)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's: the deflated message lacks its id
    return message, context, run, fab


def run_task(address: str, token: str, insecure: bool, certificates: bytes | None, load_app) -> None:
    """One ClientApp task, as ``flwr.supernode.runtime.run_clientapp.run_clientapp`` runs it, minus the exit."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.cli.install import install_from_fab
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())
    # The heartbeat raises SIGINT in this process when the node no longer holds the task: that aborts the task
    # (see ``serve``), not the executor.
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = context = reply = None
    status, details = SubStatus.FAILED, "the ClientApp task failed"
    RUNNING.set()
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        install_from_fab(fab.content, skip_prompt=True)  # a no-op once this bundle is installed
        app = load_app(run.fab_id, run.fab_version, fab.hash_str)  # the module stays imported across tasks
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except KeyboardInterrupt:
        log.warning("the SuperNode ended the task before it finished (its heartbeat was refused)")
        details, reply = "aborted: the SuperNode no longer held the task", None
    except Exception as exc:  # noqa: BLE001 -- as flwr-clientapp: the server gets an error reply
        log.exception("ClientApp task raised an exception")
        details = describe(exc)
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            # stop the heartbeat before the task ends: a heartbeat for an ended task is refused (SIGINT)
            if heartbeat.is_running:
                heartbeat.stop()
            RUNNING.clear()
            push_task_output(client, context, status, details)
        except Exception:  # noqa: BLE001 -- the node expires the task; the executor serves the next one
            log.exception("could not hand the task's reply back to the SuperNode")
        finally:
            RUNNING.clear()
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()


def parent_alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def serve(address: str, insecure: bool = True, root_certificates: str | None = None,
          parent_pid: int | None = None, poll: float = POLL_SECONDS, stop: threading.Event | None = None) -> None:
    """Serve the node's ClientApp tasks until ``stop`` is set, SIGTERM, SIGINT between tasks, or the parent
    process is gone. SIGINT during a task (which Flower's heartbeat raises when the node ended the task) aborts
    that task only."""
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        def on_term(signum: int, frame: FrameType | None) -> None:
            stop.set()

        def on_interrupt(signum: int, frame: FrameType | None) -> None:
            if RUNNING.is_set():  # Flower's task heartbeat was refused, or Ctrl-C during a task: abort the task
                raise KeyboardInterrupt
            stop.set()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_interrupt)
    certificates = None if root_certificates is None else open(root_certificates, "rb").read()  # noqa: SIM115
    load_app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    tasks = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    log.info("fedlease executor: serving the ClientApp tasks of the SuperNode at %s in process %d", address,
             os.getpid())
    try:
        while not stop.is_set() and parent_alive(parent_pid):
            response = tasks.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if response.HasField("task") and response.token:
                run_task(address, response.token, insecure, certificates, load_app)
            else:
                stop.wait(poll)
    finally:
        tasks.close()
