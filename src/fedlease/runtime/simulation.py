"""The in-process runner: every client in one process, on one shared backbone.

The runner only moves messages: it asks the method what each client gets, runs the method's client half on
each client, hands the uploads back to the method, and records what happened. Clients run one after another
on the same model; their state is swapped in and out with in-place copies. A client's data is tokenised when it
is first sampled (``ClientPool``), and its own store lives in ``<output_dir>/clients/<id>/`` under the same
commit rule as a Flower node's state folder, so memory and checkpoints follow the round's cohort, not the
federation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from fedlease.config import RunConfig, default_of, expand_tasks
from fedlease.data.partition import ClientSplit
from fedlease.data.tasks import check_tasks, task_kind
from fedlease.errors import ConfigError
from fedlease.methods import METHODS, create_method
from fedlease.methods.base import ClientInfo, FederatedMethod, Instruction, Update
from fedlease.model.backbone import Backbone, resolve_device
from fedlease.model.experts import PARTS
from fedlease.privacy import check_privacy, enabled, noise_multiplier
from fedlease.report.artifacts import PLOT_FILES, RunRecorder, format_table
from fedlease.runtime.checkpoint import FOLDER as CHECKPOINT_FOLDER
from fedlease.runtime.checkpoint import load_checkpoint, read_checkpoint_config
from fedlease.runtime.client_state import Backend, ClientState, FolderBackend, MemoryBackend, Owner
from fedlease.runtime.clients import (
    ClientPool,
    check_model_source,
    client_infos,
    load_partition,
    load_shared_backbone,
    register_user_tasks,
    resolve_defaults,
    train_settings,
)
from fedlease.runtime.loop import Evaluation, Federation, FinalSink, Sync
from fedlease.runtime.participation import Participation, check_participation
from fedlease.train import TrainingDiverged, resolve_precision

log = logging.getLogger("fedlease")
CONSOLE = "console"  # a log record with extra={CONSOLE: False} goes to training_log.txt only

# Settings that may differ when a run is resumed: they change how it is computed, not what (precision rounds
# differently; --max_batch_tokens splits batches, so dropout draws differ).
RESUME_MAY_CHANGE = frozenset({"device", "precision", "eval_batch_size", "max_batch_tokens", "generation_cache",
                               "overwrite"})

# Files a run writes at the top of its output directory; --overwrite removes exactly these (and final/).
OWNED_PATTERNS = ("training_log.txt", "training_history.json", "results.md", "lora_client_map_round_*.json",
                  "round_summary_*.json", *PLOT_FILES)
CLIENT_STATE_FOLDER = "clients"  # <output_dir>/clients/<id>/: each client's own store (in process)


@dataclass
class RunResult:
    output_dir: Path
    final: dict
    table: str


def prepare_config(config: RunConfig) -> RunConfig:
    """Expand 'task:N', validate flags, tasks and method: everything that needs no data and no model."""
    register_user_tasks(config)
    config = replace(config, tasks=expand_tasks(config.tasks)).validate()
    check_tasks(config.tasks)
    config = resolve_defaults(config)
    if task_kind(config.tasks) != "generation":
        for name, what in (("quantization", "stores the decoder"), ("generation_cache", "is the generation cache")):
            if getattr(config, name) != default_of(name):
                raise ConfigError(f"--{name} {getattr(config, name)} does not apply to this run: it {what} of "
                                  f"instruction tasks, and these tasks are classification")
    if config.method not in METHODS:
        raise ConfigError(f"unknown method {config.method!r}; known methods: {' '.join(METHODS)}")
    if config.warmup_rounds >= config.global_rounds:
        raise ConfigError(f"--warmup_rounds ({config.warmup_rounds}) must be smaller than --global_rounds "
                          f"({config.global_rounds}), so that rounds remain after clustering")
    if config.method == "fedlease" and config.warmup_rounds < 1:
        raise ConfigError("fedlease clusters clients on their warmup LoRAs: --warmup_rounds must be at least 1")
    check_participation(config)
    check_privacy(config)
    if enabled(config):
        noise_multiplier(config, METHODS[config.method].privacy_plan(config))  # a budget it cannot meet fails here
    return config


def holds_run(out: Path) -> bool:
    return (out / "training_history.json").exists() or (out / "training_log.txt").exists()


def check_output_dir(config: RunConfig) -> Path:
    """Refuse an output directory that cannot be used, without creating or changing anything."""
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} exists and is not a directory")
    if holds_run(out) and not config.overwrite:
        raise ConfigError(f"--output_dir {out} already holds a run; pass --resume {out} to continue it, "
                          f"--overwrite to replace it, or choose another directory")
    return out


def remove_run_files(out: Path) -> None:
    for pattern in OWNED_PATTERNS:
        for path in out.glob(pattern):
            path.unlink()
    for path in (*(out / "final").glob("client_*.safetensors"), *(out / CHECKPOINT_FOLDER).glob("*")):
        path.unlink()
    shutil.rmtree(out / CLIENT_STATE_FOLDER, ignore_errors=True)


def create_output_dir(out: Path) -> bool:
    """Create (or clear our files from) ``out``; return whether the directory is new."""
    created = not out.exists()
    if holds_run(out):
        remove_run_files(out)  # --overwrite: check_output_dir refused this directory otherwise
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fedlease-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--output_dir {out} is not writable ({exc.strerror})") from None
    return created


@contextlib.contextmanager
def logging_to(path: Path) -> Iterator[None]:
    """Copy the "fedlease" log into ``path`` (training_log.txt) for the duration of a run. The console is
    the application's business (the command line logs there); a library caller configures its own."""
    log.setLevel(logging.INFO)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


def pool_capacity(config: RunConfig) -> int | None:
    """How many clients stay tokenised: all of them in a closed federation (each is used every round), else
    enough for two rounds' cohorts."""
    participation = Participation(config)
    if not participation.partial:
        return None
    per_round = config.clients_per_round or math.ceil(config.sample_rate * config.num_clients)
    return max(2 * per_round, 32)


def build_clients(config: RunConfig, splits: list[ClientSplit], capacity: int | None = None
                  ) -> tuple[Backbone, ClientPool, list[ClientInfo]]:
    """Load the model once; each client's splits are tokenised once, when it is first used (``capacity``: how
    many stay tokenised, None for all)."""
    for split in splits:
        if split.reused:
            log.info("client %d (%s): %d examples reused from other clients' slices (--allow_overlap)",
                     split.client_id, split.task, split.reused)
    backbone = load_shared_backbone(config)
    settings = train_settings(config, backbone)
    log.info("precision: %s", "fp32" if settings.amp_dtype is None else f"autocast {settings.amp_dtype}")
    return backbone, ClientPool(config, backbone, settings, splits, capacity), client_infos(config)


class InProcessTransport:
    """Every client in this process: the method's client half runs directly on the shared model. Each client's own
    store is a :class:`ClientState`, committed by the same rule as on a Flower node, in a folder per client under
    ``state_dir`` (in memory without one)."""

    fuses_evaluation = False  # no messages to save: a round is evaluated, recorded and checkpointed at once

    def __init__(self, method: FederatedMethod, clients: ClientPool, progress: bool, total_rounds: int,
                 state_dir: Path | None = None) -> None:
        self.method = method
        self.clients = clients
        self.states: dict[int, ClientState] = {}
        self.progress = progress
        self.total_rounds = total_rounds
        self.state_dir = state_dir

    def state(self, cid: int, sync: Sync) -> ClientState:
        if cid not in self.states:
            backend: Backend = MemoryBackend() if self.state_dir is None else FolderBackend(self.state_dir / str(cid))
            self.states[cid] = ClientState(backend, Owner(sync.federation, cid))
        return self.states[cid]

    def available(self) -> None:
        return None  # every client is in this process

    def store(self, cid: int, sync: Sync, training: int | None = None) -> dict[str, torch.Tensor]:
        store = self.state(cid, sync).current(sync.of(cid), training)
        assert store is not None, "an in-process client keeps every accepted version"
        return store

    def restore(self, stores: Mapping[int, Mapping[str, torch.Tensor]], sync: Sync) -> None:
        """Put back the committed stores a checkpoint holds."""
        for cid, store in stores.items():
            self.state(cid, sync).restore(sync.of(cid), store)

    def bar(self, items, rnd: int, what: str):
        return tqdm(items, desc=f"round {rnd + 1}/{self.total_rounds} {what}", unit="client",
                    disable=not self.progress, leave=False, file=sys.stderr)

    def train(self, rnd: int, instructions: Mapping[int, Instruction], sync: Sync) -> dict[int, Update]:
        updates = {}
        for cid, ins in self.bar(instructions.items(), rnd, "train"):
            store = self.store(cid, sync, rnd)
            try:
                updates[cid] = self.method.client_update(self.clients[cid], ins, rnd, store)
            except TrainingDiverged as exc:
                raise TrainingDiverged(f"round {rnd + 1}, {exc}") from None
            self.states[cid].stage(rnd, store)
        return updates

    def evaluate(self, rnd: int, instructions: Mapping[int, Instruction], final: FinalSink | None, sync: Sync
                 ) -> dict[int, Evaluation]:
        evaluations = {}
        for cid, ins in self.bar(instructions.items(), rnd, "evaluate"):
            metrics = self.method.client_evaluate(self.clients[cid], ins, rnd, self.store(cid, sync))
            adapted = self.clients[cid].adapted
            evaluations[cid] = Evaluation(metrics)
            if final is not None:
                final(cid, adapted.layout, adapted.state(PARTS))
        return evaluations

    def client_stores(self, sync: Sync) -> dict[int, dict[str, torch.Tensor]] | None:
        if self.state_dir is not None:
            return None  # in their folders, which keep the version of every accepted round a checkpoint names
        return {cid: self.store(cid, sync) for cid in self.states}


def config_changes(recorded: RunConfig, wanted: Mapping[str, object]) -> list[str]:
    """Each setting in ``wanted`` that differs from the run's ``recorded`` one and shapes the results, named."""
    changes = []
    for name, value in wanted.items():
        if name == "output_dir" or name in RESUME_MAY_CHANGE:
            continue
        if name == "tasks":
            value = expand_tasks(list(value))
        if name in ("model_name", "rank"):  # "auto" and an unset rank stand for the run's kind's defaults
            value = getattr(resolve_defaults(replace(recorded, **{name: value})), name)
        if value != getattr(recorded, name):
            changes.append(f"--{name} {value} (the run used {getattr(recorded, name)})")
    return changes


def refuse_changes(output_dir: object, recorded: RunConfig, wanted: Mapping[str, object]) -> None:
    """Refuse to resume the run in ``output_dir`` with a setting that shapes the results changed, naming it."""
    if changes := config_changes(recorded, wanted):
        raise ConfigError(f"cannot resume {output_dir} with a different configuration: {', '.join(changes)}")


def resume_config(output_dir: str, explicit: Mapping[str, object]) -> RunConfig:
    """The configuration of the run in ``output_dir``, with the flags given again; any difference in a
    setting that shapes the results is refused, naming it."""
    ckpt_config = read_checkpoint_config(Path(output_dir))
    config = RunConfig.from_dict({**ckpt_config, "output_dir": output_dir})
    refuse_changes(output_dir, config, explicit)
    return replace(config, **{k: v for k, v in explicit.items() if k in RESUME_MAY_CHANGE})


def run(config: RunConfig, *, progress: bool = True, resume: bool = False) -> RunResult:
    """Run one federated training end to end and write its artifacts; see ``fedlease.report.artifacts``.

    Everything that can be checked without training (flags, tasks, data, partition, model location) is
    checked before the output directory is touched; a run that fails before its first round is recorded
    leaves nothing behind. After every round a checkpoint is saved; ``resume`` continues from the last one
    (use :func:`resume_config` to get the configuration back).
    """
    config = prepare_config(config)
    out = Path(config.output_dir).expanduser()
    ckpt = load_checkpoint(out) if resume else None
    if ckpt is None:
        check_output_dir(config)
    elif ckpt.info.get("runtime") == "flower":  # its clients' own stores are on the nodes, not in the checkpoint
        raise ConfigError(f"--resume {out}: this run was made on Flower; continue it there "
                          f"(flwr run ... --run-config \"resume=true output-dir='{out}'\")")
    _, splits = load_partition(config)
    check_model_source(config)
    resolve_precision(config.precision, resolve_device(config.device), config.quantization)
    created = create_output_dir(out) if ckpt is None else False
    recorder = None
    try:
        with logging_to(out / "training_log.txt"):
            if ckpt is None:
                log.info("fedlease %s: %d clients (%s), %d rounds (%d warmup), output %s", config.method,
                         config.num_clients, " ".join(config.tasks), config.global_rounds, config.warmup_rounds,
                         out)
            else:
                log.info("resuming %s after round %d of %d", out, ckpt.round + 1, config.global_rounds)
            backbone, clients, infos = build_clients(config, splits, pool_capacity(config))
            method = create_method(config, infos)
            method.initial = backbone.adapted.initial_state  # public: the reference of DP's first aggregates
            info = {"model_source": backbone.source, "device": str(backbone.device),
                    "precision": str(clients.settings.amp_dtype or "fp32"), "pair_encoding": backbone.pair_encoding}
            recorder = RunRecorder(out, config, infos, info, Participation(config).unseen)
            recorder.describe_clients([
                {"client_id": s.client_id, "task": s.task, "labels": list(infos[s.client_id].labels),
                 "train_examples": len(s.train), "test_examples": len(s.test), "reused_examples": s.reused}
                for s in splits])
            transport = InProcessTransport(method, clients, progress, config.global_rounds,
                                           out / CLIENT_STATE_FOLDER)
            federation = Federation(config, method, transport, recorder, out, info)
            start = 0
            if ckpt is not None:
                if ckpt.info.get("precision") != info["precision"]:
                    log.info("note: the run used precision %s, this machine resolves %s; results may differ "
                             "slightly from an uninterrupted run", ckpt.info.get("precision"), info["precision"])
                start = federation.restore(ckpt)
                transport.restore(ckpt.stores, federation.sync())
            final = federation.run(start)
            table = format_table(final)
            # the command line prints the table on stdout; the console log need not repeat it
            log.info("final results (round %d, %s):\n%s", config.global_rounds, config.method, table,
                     extra={CONSOLE: False})
    except BaseException:
        if ckpt is None and (recorder is None or not recorder.history["rounds"]):
            remove_run_files(out)
            if created:
                shutil.rmtree(out, ignore_errors=True)
        raise
    return RunResult(out, final, table)
