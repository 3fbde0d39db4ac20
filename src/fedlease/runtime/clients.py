"""Building clients on this process's backbone: shared by the in-process runner and the Flower ClientApp, so a
client is the same object, with the same data slice, whichever runtime trains it."""

from __future__ import annotations

from fedlease.config import RunConfig
from fedlease.data.partition import ClientSplit, partition_clients
from fedlease.data.tasks import TaskData, get_spec, load_task
from fedlease.methods.base import ClientInfo
from fedlease.model.backbone import Backbone, load_backbone
from fedlease.train import LocalClient, TrainSettings, encode, resolve_precision


def client_infos(config: RunConfig) -> list[ClientInfo]:
    """What the server knows of each client: its id, task and label set (never its data)."""
    return [ClientInfo(cid, task, get_spec(task).labels) for cid, task in enumerate(config.tasks)]


def load_partition(config: RunConfig, only_task: str | None = None
                   ) -> tuple[dict[str, TaskData], list[ClientSplit]]:
    """Load the tasks (or one task) and draw the clients' slices; tasks are partitioned independently."""
    tasks = [only_task] if only_task else list(dict.fromkeys(config.tasks))
    data = {task: load_task(task, config.data_dir) for task in tasks}
    splits = partition_clients(config.tasks, data, config.train_samples, config.test_samples, config.seed,
                               config.partition, config.alpha, config.allow_overlap)
    return data, splits


def load_shared_backbone(config: RunConfig) -> Backbone:
    """The one frozen backbone of this process, with a head as wide as the largest label set of the run."""
    num_labels = max(get_spec(task).num_labels for task in config.tasks)
    return load_backbone(config.model_name, num_labels, rank=config.rank, alpha=config.lora_alpha,
                         dropout=config.lora_dropout, target_modules=config.target_modules, device=config.device,
                         attention_dropout=not config.no_attention_dropout, pair_encoding=config.pair_encoding)


def train_settings(config: RunConfig, backbone: Backbone) -> TrainSettings:
    return TrainSettings(config.lr, config.weight_decay, config.batch_size, config.local_epochs,
                         config.max_grad_norm, config.eval_batch_size, backbone.device,
                         resolve_precision(config.precision, backbone.device))


def local_client(config: RunConfig, backbone: Backbone, settings: TrainSettings, split: ClientSplit) -> LocalClient:
    """One client's slice, tokenised once, bound to the shared backbone."""
    separate = backbone.pair_encoding == "separate"
    return LocalClient(split.client_id, get_spec(split.task), backbone.adapted,
                       encode(backbone.tokenizer, split.train, config.max_length, separate),
                       encode(backbone.tokenizer, split.test, config.max_length, separate), settings)
