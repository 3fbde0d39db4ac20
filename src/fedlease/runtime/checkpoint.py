"""Checkpoints: after every round, everything needed to continue, or nothing.

A checkpoint is two files in ``<output_dir>/checkpoint/``:

- ``state-<round>.safetensors``: every tensor (the method's server state and each client's own store),
  written to a temporary file, fsynced and renamed;
- ``manifest.json``: the round, the run configuration, the structure that puts the tensors back together,
  the metrics so far, the SHA-256 of the tensor file, and a SHA-256 of the manifest's own content. It is
  written the same way, after the tensor file, so it only ever names a complete tensor file; the previous
  tensor file is deleted only once the new manifest is in place.

Nothing is unpickled: tensors are safetensors, the rest is JSON. A truncated or altered checkpoint fails its
checksum and is refused as a whole. No RNG state is stored because there is none to store: every random draw
is seeded from (seed, round, client) when it is made (``fedlease.seeding``), and optimisers live for one
local call.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedlease.errors import FedleaseError
from fedlease.storage import atomic_write_bytes

FOLDER = "checkpoint"
MANIFEST = "manifest.json"
FORMAT = 1


class CheckpointError(FedleaseError):
    """A checkpoint that is missing, damaged or from another run."""


def pack(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON skeleton of nested dicts/lists/tensors/scalars; tensors go into ``tensors`` under their path."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu").clone()  # clone: safetensors refuses shared storage
        return {"t": path}
    if isinstance(value, Mapping):
        return {"d": [[key, pack(item, f"{path}/{key}", tensors)] for key, item in value.items()]}
    if isinstance(value, list | tuple):
        return {"l": [pack(item, f"{path}/{i}", tensors) for i, item in enumerate(value)]}
    return {"v": value}


def unpack(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if "t" in skeleton:
        return tensors[skeleton["t"]]
    if "d" in skeleton:
        return {key: unpack(item, tensors) for key, item in skeleton["d"]}
    if "l" in skeleton:
        return [unpack(item, tensors) for item in skeleton["l"]]
    return skeleton["v"]


def sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return sha256(json.dumps(body, sort_keys=True).encode("utf-8"))


@dataclass
class Checkpoint:
    round: int  # the last completed round (0-based)
    config: dict[str, Any]
    method_state: dict[str, Any]
    stores: dict[int, dict[str, torch.Tensor]]
    history: dict[str, Any]
    info: dict[str, Any]


def save_checkpoint(out: Path, ckpt: Checkpoint) -> None:
    folder = out / FOLDER
    tensors: dict[str, torch.Tensor] = {}
    skeleton = pack({"method": ckpt.method_state, "stores": ckpt.stores}, "s", tensors)
    payload = save(tensors)
    name = f"state-{ckpt.round + 1}.safetensors"
    atomic_write_bytes(folder / name, payload)
    manifest = {"format": FORMAT, "round": ckpt.round, "tensors": name, "tensors_sha256": sha256(payload),
                "config": ckpt.config, "skeleton": skeleton, "history": ckpt.history, "info": ckpt.info}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest).encode("utf-8"))
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def has_checkpoint(out: Path) -> bool:
    return (out / FOLDER / MANIFEST).exists()


def read_manifest(out: Path) -> dict[str, Any]:
    """The manifest of the checkpoint in ``out``, after its own checksum is verified."""
    path = out / FOLDER / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{out} has no checkpoint to resume from ({FOLDER}/{MANIFEST} is missing)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        intact = isinstance(manifest, dict) and manifest.get("manifest_sha256") == manifest_digest(manifest)
    except (UnicodeDecodeError, json.JSONDecodeError):
        intact = False
    if not intact:
        raise CheckpointError(f"{path} is damaged or was altered (checksum mismatch); refusing to resume from it")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {manifest.get('format')}, this fedlease reads {FORMAT}")
    return manifest


def read_checkpoint_config(out: Path) -> dict[str, Any]:
    return dict(read_manifest(out)["config"])


def load_checkpoint(out: Path) -> Checkpoint:
    manifest = read_manifest(out)
    tensor_path = out / FOLDER / manifest["tensors"]
    try:
        payload = tensor_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{tensor_path} is missing; refusing to resume") from None
    if sha256(payload) != manifest["tensors_sha256"]:
        raise CheckpointError(f"{tensor_path} is damaged or was altered (checksum mismatch); refusing to resume")
    try:
        tensors = load(payload)
    except SafetensorError as exc:
        raise CheckpointError(f"{tensor_path} is not a readable safetensors file ({exc})") from None
    state = unpack(manifest["skeleton"], tensors)
    stores = {int(cid): dict(store) for cid, store in state["stores"].items()}
    return Checkpoint(manifest["round"], manifest["config"], state["method"], stores, manifest["history"],
                      manifest["info"])
