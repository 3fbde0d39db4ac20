"""A trained client as a model to use: ``load_client(run, client)`` and ``ClientModel.predict``.

The client is rebuilt from its final file alone (``fedlease.use.final``): the backbone named by the run's model id,
the adapted modules, head width and pair encoding it was trained with, the layout and state it was last evaluated
with, and the method's own way of computing its outputs (``FederatedMethod.apply_final``: FedDPA mixes its two
adapters per input). So its outputs on the client's test split are the ones the run recorded.

    from fedlease import load_client
    model = load_client("runs/x", client=3)
    model.predict(["a gripping, beautifully made film"])   # [{"label": "positive", "probabilities": {...}}]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from fedlease.data.tasks import Example, TaskSpec, get_spec
from fedlease.errors import ConfigError
from fedlease.methods import create_method
from fedlease.model.backbone import Backbone, load_backbone
from fedlease.runtime.clients import client_infos, load_partition, train_settings
from fedlease.train import Encoded, LocalClient, compute_metrics, encode

if TYPE_CHECKING:
    from fedlease.generation import LMEncoded
from fedlease.use.final import FinalClient, read_final

CHUNK = 1024  # inputs scored per step of the progress bar


def empty_split() -> Encoded:
    none = torch.zeros(0, dtype=torch.long)
    return Encoded(torch.zeros(0, 0, dtype=torch.long), None, none, none)


class TrainedClient:
    """One trained client of a run, rebuilt from its final file: the backbone, the method, the client half.
    ``own``: the client's own examples where they are not a slice of the run's data (a newcomer's)."""

    def __init__(self, final: FinalClient, device: str = "auto", batch_size: int | None = None,
                 progress: bool = False, own: list | None = None) -> None:
        config = replace(final.config, device=device, eval_batch_size=batch_size or final.config.eval_batch_size)
        self.final, self.config, self.progress, self.own = final, config, progress, own
        self.spec: TaskSpec = replace(get_spec(final.task), labels=final.labels)
        self.backbone = self.load_backbone()
        self.method = create_method(config, client_infos(config))
        train = self.split("train") if self.method.reads_train_data else None
        self.client = self.make_client(train)

    def load_backbone(self) -> Backbone:
        raise NotImplementedError

    def make_client(self, train) -> LocalClient:
        raise NotImplementedError

    def encode(self, examples: Sequence) -> Encoded | LMEncoded:
        raise NotImplementedError

    def examples(self, split: str) -> list:
        """The client's own ``split`` ("train" or "test") as the run drew it (its data must be where the run
        read it: ``--data_dir``, ``--instruction_dir``); a newcomer's examples, for either."""
        if self.own is not None:
            return self.own
        _, splits = load_partition(self.config, only_task=self.final.task)
        mine = next(s for s in splits if s.client_id == self.final.client)
        return mine.train if split == "train" else mine.test

    def split(self, split: str) -> Encoded | LMEncoded:
        return self.encode(self.examples(split))

    def applied(self, data: Encoded | LMEncoded) -> torch.Tensor | None:
        """The client's final model on the shared backbone, for ``data``: its per-example expert weights or None."""
        return self.method.apply_final(self.client, self.final.layout, self.final.state, data)

    def chunks(self, examples: Sequence, what: str) -> list:
        chunks = [examples[i:i + CHUNK] for i in range(0, len(examples), CHUNK)]
        return tqdm(chunks, desc=what, unit="chunk", disable=not self.progress or len(chunks) < 2)


class ClientModel(TrainedClient):
    """A trained client of a classification run, ready to classify texts."""

    def load_backbone(self) -> Backbone:
        final, config = self.final, self.config
        return load_backbone(config.model_name, final.head_width, rank=config.rank, alpha=config.lora_alpha,
                             dropout=config.lora_dropout, target_modules=final.target_modules, device=config.device,
                             attention_dropout=not config.no_attention_dropout, pair_encoding=final.pair_encoding)

    def make_client(self, train: Encoded | None) -> LocalClient:
        return LocalClient(self.final.client, self.spec, self.backbone.adapted,
                           empty_split() if train is None else train, empty_split(),
                           train_settings(self.config, self.backbone))

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels

    def encode(self, examples: Sequence[Example]) -> Encoded:
        return encode(self.backbone.tokenizer, list(examples), self.config.max_length,
                      self.backbone.pair_encoding == "separate")

    def scores(self, examples: Sequence[Example]) -> tuple[torch.Tensor, float]:
        """Logits (N, classes) in input order, and the mean loss against the examples' labels."""
        if not examples:
            return torch.zeros(0, len(self.labels)), float("nan")
        logits, loss = [], 0.0
        for chunk in self.chunks(examples, "predict"):
            data = self.encode(chunk)
            out, mean = self.client.scores(data, self.applied(data))
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


def trained_model(final: FinalClient, device: str = "auto", batch_size: int | None = None, progress: bool = False,
                  max_new_tokens: int | None = None, own: list | None = None) -> TrainedClient:
    """The model of ``final``: a :class:`ClientModel` for a classification run, a :class:`GeneratorModel` for an
    instruction run (the one place that chooses)."""
    if final.kind == "generation":
        from fedlease.use.generator import GeneratorModel

        return GeneratorModel(final, device, batch_size, progress, own, max_new_tokens)
    return ClientModel(final, device, batch_size, progress, own)


def load_client(run: str | Path, client: int, *, device: str = "auto", batch_size: int | None = None,
                progress: bool = False, max_new_tokens: int | None = None) -> TrainedClient:
    """Client ``client`` of the finished run in ``run``, rebuilt from its final file: a :class:`ClientModel` for a
    classification run, a :class:`GeneratorModel` for an instruction run."""
    return trained_model(read_final(run, client), device, batch_size, progress, max_new_tokens)


def load_newcomer(run: str | Path, examples: Sequence, *, task: str | None = None, device: str = "auto",
                  batch_size: int | None = None, progress: bool = False, max_new_tokens: int | None = None
                  ) -> tuple[TrainedClient, dict[str, float]]:
    """A model for a client that was not in the run, chosen with its own ``examples`` as the method chooses a
    newcomer's (``fedlease.use.newcomer``), and its metrics on those examples: ``Example``s (labelled texts) for a
    classification run, ``InstructionExample``s (instruction, input, output) for an instruction run."""
    from fedlease.use.newcomer import place_newcomer

    final, metrics = place_newcomer(run, list(examples), task, device)
    return trained_model(final, device, batch_size, progress, max_new_tokens, list(examples)), metrics
