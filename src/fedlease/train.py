"""Local training and evaluation of one client on the shared backbone.

Each client's examples are tokenised once, into one padded tensor per split; batches are cut from it by
index and trimmed to their longest row rounded up to a multiple of 8 (dynamic padding; the rounding bounds the
number of distinct batch shapes, so oneDNN's and ideep's per-shape kernel caches stop growing with every new
client's lengths: 16 vs 4 clients' peak memory 1.32x instead of 1.63x, for ~11% speed on short inputs; see
benchmarks/results/details.md, "Speed and memory"). Training batches are grouped by length (shuffle, sort within
chunks of 50 batches, shuffle the batches), which removes most padding; the price is that for a client of up to 50
batches 60-81% of the example pairs that share a batch share one again the next epoch (benchmarks/batch_grouping.py; the
effect on accuracy is not yet measured). A fresh AdamW with linear decay is used per local call, as in the
released code (Hugging Face Trainer defaults: weight decay on matrices only, gradient clipping at 1.0, and the
fused AdamW kernel, the Trainer's default from torch 2.8). Matrix
products run under autocast in the dtype ``--precision`` resolves to (bf16 on CUDA and on CPUs with native bf16;
fp16 with loss scaling on GPUs without bf16); parameters and optimiser state stay fp32. Evaluation runs under
``torch.inference_mode``.

With record-level differential privacy (``--dp_unit record``) the method hands the client a
:class:`fedlease.privacy.record.DPSGD` before it trains, and ``fit`` runs DP-SGD instead (``fit_private``): Poisson
batches, each example's gradient computed on its own, clipped and noised by Opacus' DPOptimizer around the same
AdamW and linear decay; the global gradient clipping is replaced by the per-example clip.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from fedlease.data.tasks import Example, TaskSpec
from fedlease.errors import ConfigError, FedleaseError
from fedlease.model.bi_encoder import BiEncoderClassifier
from fedlease.model.experts import AdaptedModel, ExpertLayout
from fedlease.privacy import per_example
from fedlease.privacy import record as record_dp

LENGTH_GROUP_BATCHES = 50
PAD_MULTIPLE = 8


class TrainingDiverged(FedleaseError):
    """The training loss became NaN or infinite."""


@dataclass
class Encoded:
    """One split of one client, tokenised: rows padded to the longest row of the split (rounded up to a multiple
    of 8, at most ``max_length``). With ``second``, each example is a pair whose texts are encoded separately
    (a bi-encoder backbone): this holds the first texts and ``second`` the second ones."""

    input_ids: torch.Tensor  # (N, L)
    token_type_ids: torch.Tensor | None  # (N, L) for models that use segments
    lengths: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)
    second: Encoded | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def example_lengths(self) -> torch.Tensor:
        """Tokens per example (the longer text of a separately encoded pair): what batches are grouped by."""
        return self.lengths if self.second is None else torch.maximum(self.lengths, self.second.lengths)

    def subset(self, index: torch.Tensor) -> Encoded:
        return Encoded(self.input_ids[index], None if self.token_type_ids is None else self.token_type_ids[index],
                       self.lengths[index], self.labels[index],
                       None if self.second is None else self.second.subset(index))


def round_up(length: int) -> int:
    return -(-length // PAD_MULTIPLE) * PAD_MULTIPLE


def encode(tokenizer, examples: list[Example], max_length: int, separate_pairs: bool = False) -> Encoded:
    """Tokenise ``examples``; a pair is one joint sequence, or with ``separate_pairs`` two sequences."""
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    text_a = [ex.text_a for ex in examples]
    text_b = [ex.text_b or "" for ex in examples] if examples and examples[0].text_b is not None else None
    if separate_pairs and text_b is not None:
        (ids_a, _, lengths_a), (ids_b, _, lengths_b) = (tokenize(tokenizer, texts, None, max_length)
                                                        for texts in (text_a, text_b))
        return Encoded(ids_a, None, lengths_a, labels, Encoded(ids_b, None, lengths_b, labels))
    return Encoded(*tokenize(tokenizer, text_a, text_b, max_length), labels)


def tokenize(tokenizer, text_a: list[str], text_b: list[str] | None, max_length: int
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Token ids and token types, padded to the split's (rounded) longest row, and each row's length."""
    enc = tokenizer(text_a, text_b, truncation=True, max_length=max_length)
    lengths = torch.tensor([len(ids) for ids in enc["input_ids"]], dtype=torch.long)
    width = min(round_up(int(lengths.max())), max_length) if len(lengths) else 0  # never past the model's limit

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    token_types = enc.get("token_type_ids")
    return pad(enc["input_ids"], tokenizer.pad_token_id), None if token_types is None else pad(token_types, 0), lengths


def batch_indices(lengths: torch.Tensor, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Training (with a generator): length-grouped random batches. Evaluation (None): sorted by length."""
    n = len(lengths)
    if generator is None:
        order = torch.argsort(lengths, descending=True, stable=True)
        return list(order.split(batch_size))
    perm = torch.randperm(n, generator=generator)
    batches: list[torch.Tensor] = []
    for chunk in perm.split(batch_size * LENGTH_GROUP_BATCHES):
        chunk = chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
        batches.extend(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def batch_width(texts: Sequence[Encoded], index: torch.Tensor) -> int:
    """The width of rows ``index``: their longest text rounded up to a multiple of 8, at most the encoded width."""
    return max(min(round_up(int(t.lengths[index].max())), t.input_ids.shape[1]) for t in texts)


def token_chunks(index: torch.Tensor, tokens_of: Callable[[torch.Tensor], int], budget: int) -> list[torch.Tensor]:
    """``index`` cut into consecutive runs of rows of at most ``budget`` padded tokens each (``tokens_of``: what a
    run of rows takes as one batch); a row over the budget alone is a run of its own. ``budget`` 0: one run."""
    if budget <= 0 or tokens_of(index) <= budget:
        return [index]
    chunks, start = [], 0
    for end in range(2, len(index) + 1):
        if tokens_of(index[start:end]) > budget:
            chunks.append(index[start:end - 1])
            start = end - 1
    chunks.append(index[start:])
    return chunks


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; onto a GPU through pinned memory, without waiting. A copy from pageable memory
    first waits for every kernel queued before it, so the host could never run ahead of the GPU: with a batch
    copied in every step, each step's host work and the GPU's would take turns instead of overlapping."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def make_batch(data: Encoded, index: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor | int]:
    """The batch of rows ``index``, trimmed to its longest row rounded up to a multiple of 8. A separately
    encoded pair gives the first texts' rows, then the second texts' rows, at one width."""
    texts = [data] if data.second is None else [data, data.second]
    width = batch_width(texts, index)
    ids = torch.cat([F.pad(t.input_ids[index, :width], (0, max(0, width - t.input_ids.shape[1]))) for t in texts])
    lengths = torch.cat([t.lengths[index] for t in texts])
    batch: dict[str, torch.Tensor | int] = {
        "input_ids": ids,
        "attention_mask": (torch.arange(width) < lengths[:, None]).long(),
    }
    if data.token_type_ids is not None:
        batch["token_type_ids"] = data.token_type_ids[index, :width]
    if data.second is not None:
        batch["texts_per_example"] = 2
    return {key: to_device(value, device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def fused_adamw(params: Sequence[torch.nn.Parameter]) -> bool:
    """Whether AdamW can update ``params`` with its fused kernel: one operation per parameter group instead of
    about ten per parameter (the default on a CPU; the default on CUDA, foreach, groups them but still issues
    about ten per group, and under fp16 loss scaling waits for the GPU to read whether a gradient overflowed).
    fp32 parameters on a CPU (torch 2.4 on) or CUDA, what the trainable LoRA, router and head always are."""
    return bool(params) and all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)


def native_cpu_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device, quantization: str = "none") -> torch.dtype | None:
    """The autocast dtype for ``--precision`` on ``device`` (None: plain fp32). 8-bit weights compute in fp16:
    bitsandbytes' LLM.int8 products take fp16 inputs (a bf16 one is cast, with a warning, in every call), so
    ``auto`` is fp16 there and bf16 is refused."""
    cuda = device.type == "cuda"
    if quantization == "8bit" and precision == "bf16":
        raise ConfigError("--precision bf16 with --quantization 8bit: bitsandbytes' 8-bit products take fp16 "
                          "inputs and would cast every bf16 one (with a warning per call); use auto or fp16")
    if precision == "auto":
        if cuda:
            if quantization == "8bit":
                return torch.float16
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if native_cpu_bf16() else None
    if precision == "fp16" and not cuda:
        raise ConfigError("--precision fp16 needs CUDA; on a CPU use bf16 or fp32")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU has no bf16; use fp16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass(frozen=True)
class TrainSettings:
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    max_grad_norm: float
    eval_batch_size: int
    device: torch.device
    amp_dtype: torch.dtype | None = None  # autocast dtype; None trains in fp32
    max_batch_tokens: int = 0  # a training batch over this many padded tokens is accumulated in parts; 0: never

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.amp_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def compute_metrics(spec: TaskSpec, labels: np.ndarray, preds: np.ndarray, loss: float) -> dict[str, float]:
    """Accuracy, and the task's F1. A client's test set under label skew may lack a class: macro-F1 averages over
    the classes that occur in its labels or predictions (a class absent from both is not scored 0), and binary
    F1 is 1 when the client has no positive example and predicts none (0 when it predicts one)."""
    metrics = {"accuracy": float(np.mean(preds == labels)), "loss": loss}
    if spec.extra_metric == "f1":
        metrics["f1"] = float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=1.0))
    elif spec.extra_metric == "macro_f1":
        metrics["macro_f1"] = float(f1_score(labels, preds, average="macro", zero_division=0))
    return metrics


class LocalClient:
    """One client's data bound to the process's shared AdaptedModel."""

    # record-level DP: set by the method around a round's training (``FederatedMethod.record_update``)
    record: record_dp.DPSGD | None = None

    def __init__(self, client_id: int, spec: TaskSpec, adapted: AdaptedModel, train: Encoded, test: Encoded,
                 settings: TrainSettings) -> None:
        self.client_id = client_id
        self.spec = spec
        self.adapted = adapted
        self.train_data = train
        self.test_data = test
        self.settings = settings

    @property
    def num_train(self) -> int:
        return len(self.train_data)

    def apply(self, layout: ExpertLayout, state: Mapping[str, torch.Tensor]) -> None:
        """Arrange the shared model as this client's model and load its state."""
        self.adapted.configure(layout)
        self.adapted.load_state(state)

    def state(self, parts: Iterable[str]) -> dict[str, torch.Tensor]:
        return self.adapted.state(parts)

    def logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # The head is as wide as the largest label set in the federation; this task uses its first columns.
        return self.adapted.model(**batch).logits[:, : self.spec.num_labels].float()

    def batch_loss(self, data: Encoded, index: torch.Tensor) -> torch.Tensor:
        """The mean training loss of rows ``index`` of ``data`` (called under autocast)."""
        batch = make_batch(data, index, self.settings.device)
        return F.cross_entropy(self.logits(batch), to_device(data.labels[index], self.settings.device))

    def example_losses(self, data: Encoded, index: torch.Tensor) -> torch.Tensor:
        """Each row's own training loss, (len(index),) (called under autocast): what DP-SGD clips one by one."""
        batch = make_batch(data, index, self.settings.device)
        return F.cross_entropy(self.logits(batch), to_device(data.labels[index], self.settings.device),
                               reduction="none")

    def batch_tokens(self, data: Encoded, index: torch.Tensor) -> int:
        """The padded tokens rows ``index`` take as one batch (a separately encoded pair: both texts' rows)."""
        texts = [data] if data.second is None else [data, data.second]
        return len(index) * len(texts) * batch_width(texts, index)

    def loss_weight(self, data: Encoded, index: torch.Tensor) -> int:
        """What ``batch_loss`` of rows ``index`` is a mean over: its examples."""
        return len(index)

    def backward_batch(self, data: Encoded, index: torch.Tensor, scaler: torch.amp.GradScaler) -> torch.Tensor:
        """The batch's mean loss, differentiated (its gradients accumulated on the trainable parameters). Over
        --max_batch_tokens, in parts of at most that many padded tokens, each part's loss weighted by its share of
        the batch (its examples, or response tokens), so the gradient is the whole batch's while the activations
        held at once are one part's. Returns the batch's loss, detached."""
        settings = self.settings
        parts = token_chunks(index, functools.partial(self.batch_tokens, data), settings.max_batch_tokens)
        if len(parts) == 1:
            with settings.autocast():
                loss = self.batch_loss(data, index)
            scaler.scale(loss).backward()
            return loss.detach()
        total = max(self.loss_weight(data, index), 1)
        loss = torch.zeros((), device=settings.device)
        for rows in parts:
            with settings.autocast():
                part = self.batch_loss(data, rows) * (self.loss_weight(data, rows) / total)
            scaler.scale(part).backward()
            loss += part.detach()
        return loss

    def fit(self, parts: Iterable[str], seed: int, epochs: int | None = None) -> dict[str, float]:
        """Train ``parts`` on the local train split; return mean loss, steps, examples and seconds."""
        if self.record is not None:
            return self.fit_private(parts, seed, epochs)
        settings, data = self.settings, self.train_data
        epochs = settings.epochs if epochs is None else epochs
        steps = epochs * math.ceil(len(data) / settings.batch_size)
        params, optimizer, schedule = self.optimizer(parts, steps)
        scaler = torch.amp.GradScaler(enabled=settings.amp_dtype == torch.float16)
        torch.manual_seed(seed)  # dropout
        order = torch.Generator().manual_seed(seed)
        model = self.adapted.model
        model.train()
        loss_sum = torch.zeros((), device=settings.device)
        start = time.perf_counter()
        for _ in range(epochs):
            for index in batch_indices(data.example_lengths, settings.batch_size, order):
                loss = self.backward_batch(data, index, scaler)
                if settings.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss
        return self.finished(params, float(loss_sum) / max(steps, 1), steps, epochs * len(data), start)

    def optimizer(self, parts: Iterable[str], steps: int
                  ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """Make ``parts`` trainable; a fresh AdamW (weight decay on matrices only) with linear decay over
        ``steps``."""
        settings = self.settings
        params = self.adapted.set_trainable(parts)
        decay = [p for p in params if p.dim() > 1]
        no_decay = [p for p in params if p.dim() <= 1]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr,
                                      fused=fused_adamw(params))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / steps))
        return params, optimizer, schedule

    def finished(self, params: list[torch.nn.Parameter], loss: float, steps: int, examples: int, start: float
                 ) -> dict[str, float]:
        """End a local training call: freeze ``params`` again, stop on a diverged loss, report the call."""
        self.adapted.model.eval()
        for param in params:
            param.requires_grad_(False)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"client {self.client_id} ({self.spec.name}): the training loss became {loss}; "
                                   f"the last good checkpoint is kept (lower --lr, or resume with --resume)")
        return {"train_loss": loss, "steps": steps, "examples": examples, "seconds": time.perf_counter() - start}

    def fit_private(self, parts: Iterable[str], seed: int, epochs: int | None = None) -> dict[str, float]:
        """``fit`` under record-level DP: as many DP-SGD steps as ``fit`` takes, each on a Poisson sample of the
        local train split (``self.record``: q, noise, clip, the client's secret seed), with the same AdamW and
        linear decay; returns the mean loss of the sampled examples, steps, examples and seconds."""
        settings, data, dp = self.settings, self.train_data, self.record
        assert dp is not None
        if settings.amp_dtype == torch.float16:
            raise ConfigError("--dp_unit record trains without fp16 loss scaling: use --precision bf16 or fp32 "
                              "(fp32 with --quantization 8bit)")
        epochs = settings.epochs if epochs is None else epochs
        steps = record_dp.steps_per_call(epochs, settings.batch_size, len(data))
        params, optimizer, schedule = self.optimizer(parts, steps)
        private = dp.optimizer(optimizer, min(settings.batch_size, len(data)), settings.device)
        torch.manual_seed(seed)  # dropout
        batches = dp.batches()

        def losses_of(rows: torch.Tensor) -> torch.Tensor:
            with settings.autocast():
                return self.example_losses(data, rows)

        model = self.adapted.model
        model.train()
        loss_sum = torch.zeros((), device=settings.device)
        examples = 0
        start = time.perf_counter()
        with per_example.hooks(model):
            for _ in range(steps):
                index = dp.batch(len(data), batches)
                parts = [chunk for part in per_example.length_parts(index, data.example_lengths)
                         for chunk in token_chunks(part, functools.partial(self.batch_tokens, data),
                                                   settings.max_batch_tokens)]
                loss_sum += per_example.gradients(losses_of, parts, params).sum()
                private.step()  # an empty batch still takes a step: the noise alone
                schedule.step()
                private.zero_grad(set_to_none=True)
                examples += len(index)
        dp.took(steps)
        record_dp.release(params)
        return self.finished(params, float(loss_sum) / max(examples, 1), steps, examples, start)

    @torch.inference_mode()
    def scores(self, data: Encoded, mixture: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """The logits (N, this task's classes) in data order, on the CPU in fp32, and the mean cross-entropy
        against ``data.labels``. ``mixture`` (N, M): per-example expert weights for "fixed" routing."""
        settings = self.settings
        self.adapted.model.eval()
        loss_sum = torch.zeros((), device=settings.device)
        order, parts = [], []  # kept on the device and copied back once: no wait for the GPU per batch
        for index in batch_indices(data.example_lengths, settings.eval_batch_size, None):
            batch = make_batch(data, index, settings.device)
            if mixture is not None:  # a separately encoded pair's rows: first texts, then second texts
                self.adapted.set_mixture(mixture[index].repeat(int(batch.get("texts_per_example", 1)), 1))
            with settings.autocast():
                logits = self.logits(batch)
            loss_sum += F.cross_entropy(logits, to_device(data.labels[index], settings.device), reduction="sum")
            order.append(index)
            parts.append(logits)
        return in_order(order, parts, (len(data), self.spec.num_labels)), float(loss_sum) / max(len(data), 1)

    def predict(self, data: Encoded, mixture: torch.Tensor | None = None) -> tuple[np.ndarray, float]:
        """Predicted labels in data order, and the mean cross-entropy (see ``scores``)."""
        logits, loss = self.scores(data, mixture)
        return logits.argmax(dim=-1).numpy(), loss

    def evaluate(self, mixture: torch.Tensor | None = None) -> dict[str, float]:
        preds, loss = self.predict(self.test_data, mixture)
        return compute_metrics(self.spec, self.test_data.labels.numpy(), preds, loss)

    def batch_embedding(self, data: Encoded, index: torch.Tensor, inputs_only: bool = False) -> torch.Tensor:
        """The embeddings of rows ``index`` of ``data`` (called under autocast and inference mode); a
        classification row is its input alone, so ``inputs_only`` changes nothing here."""
        return example_embedding(self.adapted.model, make_batch(data, index, self.settings.device))

    @torch.inference_mode()
    def embed(self, data: Encoded, inputs_only: bool = False) -> torch.Tensor:
        """Every example's embedding, in data order (N, hidden): the mean-pooled last hidden state, or with a
        bi-encoder backbone the mean of its texts' sentence embeddings. ``inputs_only``: of what the model is
        given alone, never of a reference answer (an instruction row's response), as a test query needs."""
        settings = self.settings
        self.adapted.model.eval()
        order, parts = [], []
        for index in batch_indices(data.example_lengths, settings.eval_batch_size, None):
            with settings.autocast():
                parts.append(self.batch_embedding(data, index, inputs_only))
            order.append(index)
        return in_order(order, parts, (len(data), parts[0].shape[-1] if parts else 0))

    @torch.inference_mode()
    def train_loss(self) -> float:
        """Mean cross-entropy of the current model on the local training split (IFCA's cluster choice)."""
        _, loss = self.predict(self.train_data)
        return loss



def in_order(order: list[torch.Tensor], parts: list[torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """Batches' rows ``parts`` (on the device) put back in data order ``order``, on the CPU in fp32: one copy."""
    out = torch.empty(shape)
    if parts:
        out[torch.cat(order)] = torch.cat([part.float() for part in parts]).cpu()
    return out


def example_embedding(model: torch.nn.Module, batch: Mapping[str, torch.Tensor | int]) -> torch.Tensor:
    """One embedding per example of ``batch``: a bi-encoder's sentence embeddings (the mean of a pair's two),
    else the mean of the last hidden state over the joint sequence's tokens."""
    if isinstance(model, BiEncoderClassifier):
        u, v = model.example_embeddings(batch["input_ids"], batch["attention_mask"], batch.get("texts_per_example", 1))
        return (u + v) / 2
    return masked_mean(model(**batch, output_hidden_states=True).hidden_states[-1], batch["attention_mask"])


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean over each row's real tokens of ``hidden`` (batch, tokens, width), in fp32."""
    mask = attention_mask.unsqueeze(-1).float()
    return (hidden.float() * mask).sum(1) / mask.sum(1)
