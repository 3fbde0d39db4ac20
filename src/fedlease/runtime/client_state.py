"""A client's own state across rounds, kept in step with what the server accepted.

Some methods keep state on the client that never travels: FedLEASE's warmup LoRA and data signature, FedSA-LoRA's
B, FedDPA's local adapter, local training's whole model. That is the client's *store* (``name -> tensor``).

The rule: a store that training round r produced is *staged*, and becomes current (*committed*) only once the
server has accepted the update of round r. Every message from the server says which round's update of this
client it last accepted (``accepted``, -1 for none). On each message the client reconciles first:

- a staged version of round ``accepted`` is committed; any other staged version is dropped (its update was
  rejected, missed the round's timeout or was lost, so the server never used it);
- the client works from the committed version of round ``accepted``, the empty store for -1;
- versions after ``accepted`` are dropped (the server resumed from an earlier checkpoint), and of the older
  ones only the newest is kept: a server that stops before it checkpoints this round resumes from the
  previous round, whose last accepted version is that one.

So a client's store always matches the server's view of it: after a rejected update, a timeout, a restart of
the node, or a resume of the server. With one exception: what the client has *spent* (the store's ``privacy.*``
keys: the secret its own noise is drawn from, its DP-SGD steps and releases so far) is not rolled back past a
round it is not about to train again. An upload the server did not use (a reply past the round's timeout) has
left the client all the same, so when the client trains a later round, the ``privacy.*`` values of the newest
dropped version of an earlier round are carried into its store: its noise is never a draw it released for
another model, and its running count of steps includes the dropped round's. A round that is trained again (a
server resumed from before it) starts from what it started from the first time: the same model, the same draws,
the same release.

Where a store lives is a small key-value backend: a dict (the in-process runner, whose checkpoints hold the
committed stores), Flower's node state (lost if the SuperNode restarts), or a node-local folder (survives the
node). Each version is a safetensors blob; an index (``state.json``) names the run and the client the state
belongs to and the SHA-256 of every version, and is written after the blob it names, each write atomic. A
version that fails its checksum, or an index of another run or client, is refused with a clear message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedlease.errors import FedleaseError
from fedlease.runtime.checkpoint import sha256
from fedlease.storage import atomic_write_bytes

log = logging.getLogger("fedlease")

INDEX = "state.json"
FORMAT = 1
NO_ROUND = -1
SPENT = "privacy."  # the store keys a rollback keeps from the dropped versions (see above)


class ClientStateError(FedleaseError):
    """A client's state that cannot be used: damaged, another run's, or in a folder that cannot be written."""


class Backend(Protocol):
    """Named byte strings."""

    where: str  # for messages

    def get(self, name: str) -> bytes | None: ...

    def put(self, name: str, payload: bytes) -> None: ...

    def delete(self, name: str) -> None: ...

    def names(self) -> list[str]: ...


class MemoryBackend:
    where = "memory"

    def __init__(self) -> None:
        self.items: dict[str, bytes] = {}

    def get(self, name: str) -> bytes | None:
        return self.items.get(name)

    def put(self, name: str, payload: bytes) -> None:
        self.items[name] = payload

    def delete(self, name: str) -> None:
        self.items.pop(name, None)

    def names(self) -> list[str]:
        return list(self.items)


class FolderBackend:
    """Files in a node-local folder, each written to a temporary file, fsynced and renamed."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder).expanduser()
        self.where = f"state folder {self.folder}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / ".fedlease-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ClientStateError(f"the {self.where} is not writable ({exc.strerror}); give the node a "
                                   f"writable folder (node config state-dir)") from None

    def get(self, name: str) -> bytes | None:
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, name: str, payload: bytes) -> None:
        try:
            atomic_write_bytes(self.folder / name, payload)
        except OSError as exc:
            raise ClientStateError(f"cannot write {name} in the {self.where} ({exc.strerror})") from None

    def delete(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)

    def names(self) -> list[str]:
        return [p.name for p in self.folder.iterdir() if p.is_file() and not p.name.startswith(".")]


def blob_name(rnd: int) -> str:
    return f"round-{rnd}.safetensors"


def encode(store: Mapping[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().to("cpu").contiguous().clone() for k, v in store.items()})


@dataclass(frozen=True)
class Owner:
    """The run (``federation``, an id the server draws once per run and keeps across resumes) and the client."""

    federation: str
    client: int


class ClientState:
    """One client's committed and staged stores on one backend; see the module docstring for the rule."""

    def __init__(self, backend: Backend, owner: Owner) -> None:
        self.backend = backend
        self.owner = owner
        self.committed: dict[int, str] = {}  # round -> sha256 of its blob
        self.staged: tuple[int, str] | None = None
        self.read_index()

    # -- the index ----------------------------------------------------------------------------------------
    def read_index(self) -> None:
        raw = self.backend.get(INDEX)
        if raw is None:
            if any(name.startswith("round-") for name in self.backend.names()):
                raise ClientStateError(f"the {self.backend.where} holds state files but no {INDEX}; it is not "
                                       f"this client's state: give the node an empty folder")
            return
        try:
            index = json.loads(raw)
            owner = Owner(str(index["federation"]), int(index["client"]))
            committed = {int(r): str(digest) for r, digest in index["committed"].items()}
            staged = None if index["staged"] is None else (int(index["staged"][0]), str(index["staged"][1]))
        except (ValueError, KeyError, TypeError, IndexError):
            raise ClientStateError(f"{INDEX} in the {self.backend.where} is damaged; remove the folder's "
                                   f"contents to start this client afresh") from None
        if index.get("format") != FORMAT:
            raise ClientStateError(f"{INDEX} in the {self.backend.where} has format {index.get('format')}, "
                                   f"this fedlease reads {FORMAT}")
        if owner != self.owner:
            raise ClientStateError(
                f"the {self.backend.where} holds the state of client {owner.client} of run {owner.federation}, "
                f"not of client {self.owner.client} of run {self.owner.federation}; give this node an empty "
                f"folder (node config state-dir) or remove that state")
        self.committed, self.staged = committed, staged
        self.collect()

    def write_index(self) -> None:
        index = {"format": FORMAT, "federation": self.owner.federation, "client": self.owner.client,
                 "committed": {str(r): digest for r, digest in sorted(self.committed.items())},
                 "staged": None if self.staged is None else list(self.staged)}
        self.backend.put(INDEX, json.dumps(index, indent=1).encode("utf-8"))

    def collect(self) -> None:
        """Delete blobs the index does not name (left by a crash between a blob and its index)."""
        named = {blob_name(r) for r in self.committed} | ({blob_name(self.staged[0])} if self.staged else set())
        for name in self.backend.names():
            if name.startswith("round-") and name not in named:
                self.backend.delete(name)

    # -- versions -----------------------------------------------------------------------------------------
    def read(self, rnd: int, digest: str) -> dict[str, torch.Tensor]:
        payload = self.backend.get(blob_name(rnd))
        if payload is None or sha256(payload) != digest:
            what = "is missing" if payload is None else "is damaged or was altered (checksum mismatch)"
            raise ClientStateError(f"{blob_name(rnd)} in the {self.backend.where} {what}")
        try:
            return dict(load(payload))
        except SafetensorError as exc:
            raise ClientStateError(f"{blob_name(rnd)} in the {self.backend.where} is unreadable ({exc})") from None

    def current(self, accepted: int, training: int | None = None) -> dict[str, torch.Tensor] | None:
        """Reconcile with the server's ``accepted`` round; return the store to work from (a new dict), or None
        when the version of round ``accepted`` is not here (the node lost it). ``training``: the round the store
        is for (None: an evaluation), whose earlier dropped versions pass on what they spent (see above)."""
        changed = False
        dropped = {r: d for r, d in self.committed.items() if r > accepted}  # the server resumed from before them
        if self.staged is not None and self.staged[0] != accepted:
            dropped[self.staged[0]] = self.staged[1]
        earlier = {r: d for r, d in dropped.items() if training is not None and r < training}
        spent = self.spent(*max(earlier.items())) if earlier else {}
        if self.staged is not None:
            rnd, digest = self.staged
            if rnd == accepted:
                self.committed[rnd] = digest
            self.staged = None
            changed = True
        older = [r for r in self.committed if r < accepted]
        keep = {accepted, max(older)} if older else {accepted}
        if set(self.committed) - keep:
            self.committed = {r: d for r, d in self.committed.items() if r in keep}
            changed = True
        if changed:
            self.write_index()
            self.collect()
        if accepted == NO_ROUND:
            return spent
        if accepted not in self.committed:
            return None
        return {**self.read(accepted, self.committed[accepted]), **spent}

    def spent(self, rnd: int, digest: str) -> dict[str, torch.Tensor]:
        """The ``privacy.*`` keys of the dropped version of round ``rnd`` (none where it cannot be read)."""
        try:
            return {key: value for key, value in self.read(rnd, digest).items() if key.startswith(SPENT)}
        except ClientStateError as exc:
            log.warning("client %d: %s; what it spent in round %d is not carried over", self.owner.client, exc,
                        rnd + 1)
            return {}

    def stage(self, rnd: int, store: Mapping[str, torch.Tensor]) -> None:
        """Keep the store that training round ``rnd`` produced until the server's verdict on its update."""
        payload = encode(store)
        self.backend.put(blob_name(rnd), payload)
        self.staged = (rnd, sha256(payload))
        self.write_index()

    def restore(self, rnd: int, store: Mapping[str, torch.Tensor]) -> None:
        """Make ``store`` the committed version of round ``rnd`` (a resumed in-process run's checkpoint)."""
        if rnd == NO_ROUND:
            return
        payload = encode(store)
        self.backend.put(blob_name(rnd), payload)
        self.committed[rnd] = sha256(payload)
        self.write_index()
