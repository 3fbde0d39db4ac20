"""Run ``fedlease`` in this process and SIGKILL it at a chosen point: the resume tests' crash injector.

Usage: python kill_harness.py POINT[:N] fedlease-args...
  fit:N              at the start of the N-th local training call (during a round)
  after-clustering   right after FedLEASE's allocation step returns
  checkpoint-write:N during the N-th atomic write of a checkpoint file: the temporary file is complete,
                     the rename has not happened
  round:N            right after round N's artifacts are written, before its checkpoint

With KILL_HARNESS_SECRETS=S in the environment, the secrets that fedlease's methods draw (the clients' DP seeds,
``fedlease.methods.base.secrets``) come from ``pin_secrets(S)`` instead, so that a test can compare the cut run with
an uninterrupted one that pins the same secrets. Only fedlease's draws: numpy seeds itself from ``secrets`` too, on
imports that happen in one process and not in another.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path


def pin_secrets(seed: int):
    """A stand-in for the ``secrets`` module in fedlease's methods: the same sequence of ``randbits`` draws for
    the same ``seed``, in any process."""
    import random
    from types import SimpleNamespace

    return SimpleNamespace(randbits=random.Random(seed).getrandbits)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def on_nth_call(owner, name: str, nth: int, before: bool = True) -> None:
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if before and calls["n"] == nth:
            die()
        result = original(*args, **kwargs)
        if not before and calls["n"] == nth:
            die()
        return result

    setattr(owner, name, wrapper)


def main() -> None:
    point, args = sys.argv[1], sys.argv[2:]
    if "KILL_HARNESS_SECRETS" in os.environ:
        from fedlease.methods import base

        base.secrets = pin_secrets(int(os.environ["KILL_HARNESS_SECRETS"]))
    kind, _, count = point.partition(":")
    nth = int(count or 1)
    if kind == "fit":
        from fedlease.train import LocalClient

        on_nth_call(LocalClient, "fit", nth)
    elif kind == "after-clustering":
        from fedlease.methods.fedlease import FedLease

        on_nth_call(FedLease, "allocate", 1, before=False)
    elif kind == "round":
        from fedlease.report.artifacts import RunRecorder

        on_nth_call(RunRecorder, "record_round", nth, before=False)
    elif kind == "checkpoint-write":
        from fedlease.runtime import checkpoint

        original = checkpoint.atomic_write_bytes
        calls = {"n": 0}

        def half_written(path: Path, payload: bytes) -> None:
            calls["n"] += 1
            if calls["n"] == nth:
                fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.write(fd, payload)
                os.fsync(fd)
                die()
            original(path, payload)

        checkpoint.atomic_write_bytes = half_written
    else:
        raise SystemExit(f"unknown kill point {point}")
    from fedlease.cli import main as fedlease_main

    sys.exit(fedlease_main(args))


if __name__ == "__main__":
    main()
