"""A run's final client files (``final/client_<id>.safetensors``), read back and checked.

Each file holds the state a client was last evaluated with, and in its metadata what rebuilds that client
(``fedlease.report.artifacts.RunRecorder.save_final_model``). Everything that reads a trained client (the Python
API, ``predict``, ``export``) starts here, so a run that cannot be used is refused in one place, with one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fedlease.config import RunConfig
from fedlease.data.tasks import get_spec
from fedlease.errors import ConfigError
from fedlease.model.experts import ExpertLayout
from fedlease.report.artifacts import FINAL_FORMAT
from fedlease.runtime.clients import register_user_tasks


@dataclass
class FinalClient:
    """One client's final model as the run saved it."""

    run: Path
    client: int
    config: RunConfig  # the run's configuration (its model id, tasks, data, seed, lengths, ...)
    task: str
    labels: tuple[str, ...]
    layout: ExpertLayout
    target_modules: list[str]
    pair_encoding: str
    head_width: int
    unseen: bool  # held out of training (--unseen_clients): its model is what the method gives a newcomer
    state: dict[str, torch.Tensor]

    @property
    def kind(self) -> str:
        """The run's kind of task: "classification" or "generation" (instruction tuning)."""
        return get_spec(self.task).kind

    @property
    def newcomer(self) -> bool:
        """Placed here by a newcomer's own data (``fedlease.use.newcomer``), not one of the run's clients."""
        return self.client >= len(self.config.tasks)


def run_history(run: Path) -> dict:
    """The run's training_history.json; a folder that holds no finished run is refused."""
    if not run.is_dir():
        raise ConfigError(f"{run}: no such run folder")
    path = run / "training_history.json"
    if not path.is_file():
        raise ConfigError(f"{run}: not a fedlease run folder (no training_history.json)")
    history = json.loads(path.read_text(encoding="utf-8"))
    if history.get("final") is None:
        raise ConfigError(f"{run}: the run is unfinished (no final round); finish it with fedlease run --resume {run}")
    return history


def read_final(run: Path | str, client: int) -> FinalClient:
    """Client ``client``'s final model in ``run``, checked: a missing, unfinished or foreign run, a client that
    is not in it, or a file written by another version of this format is refused with one line. The run's own
    tasks (``--data_dir``, ``--instruction_dir``) are registered, so its task is known."""
    run = Path(run).expanduser()
    history = run_history(run)
    clients = len(history["config"]["tasks"])
    if not 0 <= client < clients:
        raise ConfigError(f"--client {client}: {run} has clients 0 to {clients - 1}")
    path = run / "final" / f"client_{client}.safetensors"
    if not path.is_file():
        raise ConfigError(f"{run}: client {client} has no final model ({path.relative_to(run)} is missing)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None
    if meta.get("format") != FINAL_FORMAT:
        found = meta.get("format", "an older fedlease without a format tag")
        raise ConfigError(f"{path} was written by {found}; this fedlease reads {FINAL_FORMAT} (re-run the training "
                          f"with this version)")
    config = RunConfig.from_dict(json.loads(meta["config"]))
    register_user_tasks(config)
    return FinalClient(run, client, config, meta["task"], tuple(json.loads(meta["labels"])),
                       ExpertLayout.from_config(json.loads(meta["layout"])), json.loads(meta["target_modules"]),
                       meta["pair_encoding"], int(meta["head_width"]), json.loads(meta["unseen"]), state)


def recorded_metrics(run: Path | str, client: int) -> dict[str, float]:
    """What the run recorded for ``client`` in its final round (a newcomer's evaluation included)."""
    history = run_history(Path(run).expanduser())
    record = history["rounds"][-1]["clients"].get(str(client), {})
    if "eval" not in record:
        raise ConfigError(f"{run}: client {client} was not evaluated in the final round")
    return record["eval"]
