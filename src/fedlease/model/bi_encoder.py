"""Classification with a sentence-embedding model used as it was trained: each text encoded on its own.

Sentence-transformers checkpoints (the default MiniLM-L6 among them) are trained as bi-encoders: a text is
encoded alone and its token states are pooled (mean pooling for MiniLM) into a sentence embedding; their
[CLS] state and BERT pooler were never trained (MiniLM's pooler has std 0.009 and a zero bias). Reading a
sentence pair jointly through [CLS] and that pooler, as a cross-encoder would, leaves QNLI and MRPC near chance
at a few hundred examples per client (benchmarks/results/details.md, "Every task learned").

So, as Sentence-BERT trains its NLI classifier (Reimers & Gurevych, EMNLP 2019, "SoftmaxLoss"), the two texts
of a pair are encoded separately into u and v, and the head reads [u, v, |u - v|, u * v]; a single text is read
as the pair (u, u). The head (dropout + one linear layer) is new and trained; the encoder is frozen and adapted
by the LoRA experts like any other backbone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

POOLING_MODES = ("mean", "cls")


def sentence_transformers_pooling(folder: str) -> str | None:
    """The pooling of a sentence-transformers model folder ("mean" or "cls"), or None if it is not one."""
    path = Path(folder)
    modules = path / "modules.json"
    if not modules.is_file():
        return None
    for module in json.loads(modules.read_text(encoding="utf-8")):
        if module.get("type", "").endswith("Pooling"):
            config = path / module.get("path", "") / "config.json"
            settings = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
            if settings.get("pooling_mode_cls_token"):
                return "cls"
            return "mean"
    return None


class BiEncoderClassifier(nn.Module):
    """A frozen encoder that embeds each text on its own, and a head over the pair of embeddings.

    ``forward`` takes the rows of a batch's first texts followed by the rows of its second texts
    (``texts_per_example`` = 2), or one text per example (1), and returns logits like a Hugging Face model.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        self.encoder = encoder
        self.config = encoder.config
        self.pooling = pooling
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1))
        self.classifier = nn.Linear(4 * hidden, num_labels)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One sentence embedding per row, pooled as the checkpoint was trained."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def example_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           texts_per_example: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, v) per example: the embeddings of its two texts, or of its one text twice."""
        pooled = self.embed(input_ids, attention_mask)
        if texts_per_example == 1:
            return pooled, pooled
        u, v = pooled.chunk(2)
        return u, v

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, texts_per_example: int = 1) -> SequenceClassifierOutput:
        u, v = self.example_embeddings(input_ids, attention_mask, texts_per_example)
        features = torch.cat([u, v, (u - v).abs(), u * v], dim=-1)
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(features)))
