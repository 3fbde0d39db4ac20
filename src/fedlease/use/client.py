"""A trained client as a model to use: ``load_client(run, client)`` and ``ClientModel.predict``.

The client is rebuilt from its final file alone (``fedlease.use.final``): the backbone named by the run's model id,
the adapted modules, head width and pair encoding it was trained with, the layout and state it was last evaluated
with, and the method's own way of computing its outputs (``FederatedMethod.final_scores``: FedDPA mixes its two
adapters per input). So its outputs on the client's test split are the ones the run recorded.

    from fedlease import load_client
    model = load_client("runs/x", client=3)
    model.predict(["a gripping, beautifully made film"])   # [{"label": "positive", "probabilities": {...}}]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fedlease.data.tasks import Example, TaskSpec, get_spec, task_kind
from fedlease.errors import ConfigError
from fedlease.methods import create_method
from fedlease.model.backbone import load_backbone
from fedlease.runtime.clients import client_infos, load_partition, register_user_tasks, train_settings
from fedlease.train import Encoded, LocalClient, compute_metrics, encode
from fedlease.use.final import FinalClient, read_final

CHUNK = 1024  # inputs scored per step of the progress bar


def empty_split() -> Encoded:
    none = torch.zeros(0, dtype=torch.long)
    return Encoded(torch.zeros(0, 0, dtype=torch.long), None, none, none)


class ClientModel:
    """One trained client of a classification run, ready to classify texts."""

    def __init__(self, final: FinalClient, device: str = "auto", batch_size: int | None = None,
                 progress: bool = False) -> None:
        config = replace(final.config, device=device, eval_batch_size=batch_size or final.config.eval_batch_size)
        register_user_tasks(config)
        if task_kind([final.task]) != "classification":
            raise ConfigError(f"{final.run} trained instruction tasks; predict classifies texts with a "
                              f"classification run's client (generating from an instruction run is not built yet)")
        self.final, self.config, self.progress = final, config, progress
        self.spec: TaskSpec = replace(get_spec(final.task), labels=final.labels)
        self.backbone = load_backbone(config.model_name, final.head_width, rank=config.rank, alpha=config.lora_alpha,
                                      dropout=config.lora_dropout, target_modules=final.target_modules,
                                      device=device, attention_dropout=not config.no_attention_dropout,
                                      pair_encoding=final.pair_encoding)
        self.method = create_method(config, client_infos(config))
        train = self.split("train") if self.method.reads_train_data else empty_split()
        self.client = LocalClient(final.client, self.spec, self.backbone.adapted, train, empty_split(),
                                  train_settings(config, self.backbone))

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels

    def examples(self, split: str) -> list[Example]:
        """The client's own ``split`` ("train" or "test") as the run drew it (its data must be where the run
        read it: ``--data_dir``)."""
        _, splits = load_partition(self.config, only_task=self.final.task)
        mine = next(s for s in splits if s.client_id == self.final.client)
        return mine.train if split == "train" else mine.test

    def encode(self, examples: Sequence[Example]) -> Encoded:
        return encode(self.backbone.tokenizer, list(examples), self.config.max_length,
                      self.backbone.pair_encoding == "separate")

    def split(self, split: str) -> Encoded:
        return self.encode(self.examples(split))

    def scores(self, examples: Sequence[Example]) -> tuple[torch.Tensor, float]:
        """Logits (N, classes) in input order, and the mean loss against the examples' labels."""
        if not examples:
            return torch.zeros(0, len(self.labels)), float("nan")
        chunks = [examples[i:i + CHUNK] for i in range(0, len(examples), CHUNK)]
        logits, loss = [], 0.0
        for chunk in tqdm(chunks, desc="predict", unit="chunk", disable=not self.progress or len(chunks) < 2):
            out, mean = self.method.final_scores(self.client, self.final.layout, self.final.state, self.encode(chunk))
            logits.append(out)
            loss += mean * len(chunk)
        return torch.cat(logits), loss / len(examples)

    def predict(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None) -> list[dict]:
        """One prediction per text (or pair): ``label`` (its name) and ``probabilities`` (name -> probability)."""
        if self.spec.pair and text_pairs is None:
            raise ConfigError(f"task {self.spec.name} classifies text pairs: give text_pairs as well")
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ConfigError(f"{len(texts)} texts but {len(text_pairs)} text_pairs")
        pairs = text_pairs if self.spec.pair else [None] * len(texts)
        logits, _ = self.scores([Example(a, b, 0) for a, b in zip(texts, pairs, strict=True)])
        return [self.describe(row) for row in logits.softmax(dim=-1)]

    def describe(self, probabilities: torch.Tensor) -> dict:
        values = probabilities.tolist()
        return {"label": self.labels[int(np.argmax(values))],
                "probabilities": {name: round(p, 6) for name, p in zip(self.labels, values, strict=True)}}

    def evaluate(self, split: str = "test") -> tuple[dict[str, float], list[dict]]:
        """The client's metrics on its own ``split`` (the run's recorded ones, for "test"), and one prediction
        per example with its ``reference`` label."""
        examples = self.examples(split)
        logits, loss = self.scores(examples)
        labels = np.array([ex.label for ex in examples])
        metrics = compute_metrics(self.spec, labels, logits.argmax(dim=-1).numpy(), loss)
        rows = [{**self.describe(p), "reference": self.labels[ex.label]}
                for p, ex in zip(logits.softmax(dim=-1), examples, strict=True)]
        return metrics, rows


def load_client(run: str | Path, client: int, *, device: str = "auto", batch_size: int | None = None,
                progress: bool = False) -> ClientModel:
    """Client ``client`` of the finished run in ``run``, rebuilt from its final file."""
    return ClientModel(read_final(run, client), device, batch_size, progress)


def load_newcomer(run: str | Path, examples: Sequence[Example], *, task: str | None = None, device: str = "auto",
                  batch_size: int | None = None, progress: bool = False) -> tuple[ClientModel, dict[str, float]]:
    """A model for a client that was not in the run, chosen with its own labelled ``examples`` as the method
    chooses a newcomer's (``fedlease.use.newcomer``), and its metrics on those examples."""
    from fedlease.use.newcomer import place_newcomer

    final, metrics = place_newcomer(run, list(examples), task, device)
    return ClientModel(final, device, batch_size, progress), metrics
