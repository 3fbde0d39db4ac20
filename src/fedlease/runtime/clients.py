"""Building clients on this process's backbone: shared by the in-process runner and the Flower ClientApp, so a
client is the same object, with the same data slice, whichever runtime trains it.

This is where a run's kind is chosen, once: classification tasks get an encoder and ``LocalClient``s, instruction
tasks a causal LM and ``GenerationClient``s. Methods, runtimes and reports do not learn which kind they run.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import replace

from fedlease.config import AUTO_MODEL, DEFAULT_DECODER, DEFAULT_MODEL, RANK_BY_KIND, RunConfig
from fedlease.data.partition import ClientSplit, partition_clients
from fedlease.data.tasks import TaskData, get_spec, load_task, task_kind
from fedlease.methods.base import ClientInfo
from fedlease.model.backbone import Backbone, load_backbone, resolve_model_source
from fedlease.train import LocalClient, TrainSettings, encode, resolve_precision


def register_user_tasks(config: RunConfig) -> None:
    """Make a user's tasks known (in every process that builds clients): the task folders of ``--data_dir``
    (``fedlease.data.user``) and the categories of ``--instruction_dir``."""
    if config.data_dir:
        from fedlease.data.user import register_classification_folders

        register_classification_folders(config.data_dir)
    if config.instruction_dir:
        from fedlease.data.instructions import register_instruction_folder

        register_instruction_folder(config.instruction_dir)


def resolve_defaults(config: RunConfig) -> RunConfig:
    """The model and rank that "auto" and an unset rank stand for with these tasks."""
    kind = task_kind(config.tasks)
    model = config.model_name
    if model == AUTO_MODEL:
        model = DEFAULT_DECODER if kind == "generation" else DEFAULT_MODEL
    return replace(config, model_name=model, rank=config.rank or RANK_BY_KIND[kind])


def check_model_source(config: RunConfig) -> None:
    """Fail before anything is written when the model cannot be found (nothing is loaded)."""
    if task_kind(config.tasks) == "generation":
        from fedlease.model.causal_lm import resolve_decoder_source

        resolve_decoder_source(config.model_name)
    else:
        resolve_model_source(config.model_name)


def client_infos(config: RunConfig) -> list[ClientInfo]:
    """What the server knows of each client: its id, task and label set (never its data)."""
    return [ClientInfo(cid, task, get_spec(task).labels) for cid, task in enumerate(config.tasks)]


def load_partition(config: RunConfig, only_task: str | None = None
                   ) -> tuple[dict[str, TaskData], list[ClientSplit]]:
    """Load the tasks (or one task) and draw the clients' slices; tasks are partitioned independently."""
    tasks = [only_task] if only_task else list(dict.fromkeys(config.tasks))
    data = {task: load_task(task, config.data_dir, config.instruction_dir) for task in tasks}
    splits = partition_clients(config.tasks, data, config.train_samples, config.test_samples, config.seed,
                               config.partition, config.alpha, config.allow_overlap)
    return data, splits


def load_shared_backbone(config: RunConfig) -> Backbone:
    """The one frozen backbone of this process: for classification with a head as wide as the largest label
    set of the run, for instruction tasks a causal LM."""
    kind = task_kind(config.tasks)
    rank = config.rank or RANK_BY_KIND[kind]
    if kind == "generation":
        from fedlease.model.causal_lm import load_causal_lm

        return load_causal_lm(config.model_name, rank=rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                              target_modules=config.target_modules, device=config.device,
                              quantization=config.quantization, attention_dropout=not config.no_attention_dropout,
                              precision=config.precision)
    num_labels = max(get_spec(task).num_labels for task in config.tasks)
    return load_backbone(config.model_name, num_labels, rank=rank, alpha=config.lora_alpha,
                         dropout=config.lora_dropout, target_modules=config.target_modules, device=config.device,
                         attention_dropout=not config.no_attention_dropout, pair_encoding=config.pair_encoding)


def train_settings(config: RunConfig, backbone: Backbone) -> TrainSettings:
    return TrainSettings(config.lr, config.weight_decay, config.batch_size, config.local_epochs,
                         config.max_grad_norm, config.eval_batch_size, backbone.device,
                         resolve_precision(config.precision, backbone.device, config.quantization),
                         config.max_batch_tokens)


def local_client(config: RunConfig, backbone: Backbone, settings: TrainSettings, split: ClientSplit) -> LocalClient:
    """One client's slice, tokenised once, bound to the shared backbone."""
    spec = get_spec(split.task)
    if backbone.kind == "causal_lm":
        from fedlease.generation import GenerationClient, encode_instructions

        tokenizer, length = backbone.tokenizer, config.max_length
        return GenerationClient(split.client_id, spec, backbone.adapted,
                                encode_instructions(tokenizer, split.train, length),
                                encode_instructions(tokenizer, split.test, length, answers_like=split.train), settings,
                                tokenizer, config.max_new_tokens, config.generation_cache)
    separate = backbone.pair_encoding == "separate"
    return LocalClient(split.client_id, spec, backbone.adapted,
                       encode(backbone.tokenizer, split.train, config.max_length, separate),
                       encode(backbone.tokenizer, split.test, config.max_length, separate), settings)


class ClientPool:
    """The clients of this process, each tokenised when it is first needed and bound to the shared backbone.
    At most ``capacity`` stay tokenised (the least recently used is dropped first), so that the memory a run needs
    follows the clients sampled in a round, not the whole federation; None keeps every client once built."""

    def __init__(self, config: RunConfig, backbone: Backbone, settings: TrainSettings, splits: Sequence[ClientSplit],
                 capacity: int | None = None) -> None:
        self.config, self.backbone, self.settings = config, backbone, settings
        self.splits = {split.client_id: split for split in splits}
        self.capacity = capacity
        self.built: OrderedDict[int, LocalClient] = OrderedDict()

    def __getitem__(self, cid: int) -> LocalClient:
        if cid in self.built:
            self.built.move_to_end(cid)
            return self.built[cid]
        client = local_client(self.config, self.backbone, self.settings, self.splits[cid])
        self.built[cid] = client
        if self.capacity is not None and len(self.built) > self.capacity:
            self.built.popitem(last=False)
        return client

    def __len__(self) -> int:
        return len(self.splits)

    def __iter__(self) -> Iterator[LocalClient]:
        return (self[cid] for cid in sorted(self.splits))
