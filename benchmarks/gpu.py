"""GPU benchmark made for a short lease (issue 32): today's code on models of the paper's shapes, in one command.

Models are built from transformers configs written here, with random weights and a word-level tokenizer made in
code (nothing is downloaded), saved once to a scratch folder and loaded by the package's own loaders
(``load_shared_backbone``), so everything after the folder is the code a user runs:

1. ``encoder``: a roberta-large-shaped encoder (24 layers, hidden 1024, 16 heads, intermediate 4096, vocab 50265)
   on GLUE-shaped synthetic clients (sst2, qnli, mrpc, qqp: one client each, 1000 train / 200 test examples of
   the tasks' typical token lengths, tokenised by ``local_client``), batch 128, 2 local epochs, FedLEASE with
   K = 4 experts. A few whole rounds run through the runner's own loop (``Federation`` with
   ``InProcessTransport``: train, aggregate, evaluate, artifacts, checkpoint): round 1 is cold and computes the
   data signatures, round 2 is a steady warmup round (plain LoRA), round 3 a warmup round with the allocation,
   rounds 4-5 adaptive rounds (4 experts, 7-slot router). The paper's GLUE setting (16 clients x 1000, 25
   rounds, 5 of warmup) is extrapolated from the steady rounds' per-client times.
2. ``decoder_135m``: SmolLM2-135M's shape (LlamaConfig: hidden 576, 30 layers, 9 heads, 3 kv heads,
   intermediate 1536, vocab 49152, tied embeddings), bf16 frozen weights on CUDA, ``GenerationClient``s of 64
   instruction examples (up to 192 tokens), batch 8: a warmup and an adaptive local training through
   ``FedLease.client_train``, the data signature, greedy generation (48 new tokens) and the teacher-forced loss.
   Generation is then timed again with ``--generation_cache static`` (on CUDA transformers compiles the decoding
   step: the first call compiles, the second is timed), with the share of responses equal to the dynamic cache's.
3. ``llama7b_bf16`` / ``llama7b_4bit`` / ``llama7b_8bit``: LLaMA-2-7B's shape (hidden 4096, 32 layers, 32 heads,
   intermediate 11008, vocab 32000) with ``--quantization none / 4bit / 8bit`` (the latter two only where
   bitsandbytes imports and CUDA is there): one client of 32 examples, batch 8, its training steps and its
   generation; a round of 8 such clients is extrapolated.

Each part has its own time cap (SIGALRM) and the JSON is rewritten after each part, so a part that runs out of
time costs only itself. Reported: seconds per round / per client / per step, examples and tokens per second,
GPU busy fraction (NVML utilisation sampled every 50 ms in a thread), achieved TFLOP/s (FLOPs counted with
``torch.utils.flop_counter`` on a real epoch, and an analytic formula for frozen weights) against the bf16 peak,
peak memory (``torch.cuda.max_memory_allocated``), and per training step the number of aten operator calls and
CUDA kernels under ``torch.profiler``.

``--quick`` runs the same parts with tiny shapes on the CPU in well under a minute (the test suite runs it).
Prints a short table, then one JSON object as the last line of stdout; ``--out FILE`` also writes it there.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PEAK_BF16_TFLOPS = 790.0  # H200 (and H100) dense bf16, as measured on 8192^3 products here (KINDS.md: 769-798)
GLUE_TASKS = ("sst2", "qnli", "mrpc", "qqp")
# Mean tokens per text (first text, second text) of the GLUE tasks under a BPE tokenizer, roughly: what the
# synthetic clients draw their lengths around (gamma, shape 4), before the specials and the 128-token cut.
GLUE_LENGTHS = {"sst2": (11, None), "qnli": (12, 34), "mrpc": (22, 22), "qqp": (12, 13)}
PAPER_GLUE = {"clients": 16, "train_examples": 1000, "test_examples": 200, "batch_size": 128, "rounds": 25,
              "warmup_rounds": 5, "local_epochs": 2}

SHAPES = {
    "roberta-large": dict(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          intermediate_size=4096),
    "roberta-tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, tie_word_embeddings=False,
                      max_position_embeddings=4096),
    "llama-tiny": dict(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
                       max_position_embeddings=512),
    "llama-tiny-7b-like": dict(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=4, intermediate_size=172, tie_word_embeddings=False,
                               max_position_embeddings=512),
}

FULL = {
    "encoder": dict(shape="roberta-large", clients=4, train=1000, test=200, batch=128, epochs=2, rounds=5,
                    warmup=3, experts=4, max_length=128, cap=110),
    "decoder": dict(shape="smollm2-135m", clients=8, train=64, test=32, batch=8, epochs=2, max_length=192,
                    new_tokens=48, experts=4, cap=50),
    "llama": dict(shape="llama2-7b", clients=8, train=32, test=8, batch=8, epochs=1, round_epochs=2,
                  max_length=192, new_tokens=16, experts=4, build_cap=45, cap=50, quant_cap=45),
    "budget": 300,
    "precision": "auto",
}
QUICK = {
    "encoder": dict(shape="roberta-tiny", clients=4, train=48, test=16, batch=16, epochs=1, rounds=5, warmup=3,
                    experts=4, max_length=64, cap=60),
    "decoder": dict(shape="llama-tiny", clients=8, train=16, test=4, batch=8, epochs=1, max_length=64,
                    new_tokens=4, experts=4, cap=40),
    "llama": dict(shape="llama-tiny-7b-like", clients=8, train=16, test=4, batch=8, epochs=1, max_length=64,
                  new_tokens=4, experts=4, build_cap=30, cap=30, quant_cap=30),
    "budget": 150,
    "precision": "fp32",  # a CPU's bf16 kernels are built per shape: slower on a tiny model's first steps
}


# -- plumbing ---------------------------------------------------------------------------------------------------
class PartTimeout(Exception):
    """A part ran past its time cap."""


@contextlib.contextmanager
def time_cap(seconds: float):
    """Raise PartTimeout in this (main) thread after ``seconds``; between Python bytecodes, so a CUDA call in
    flight finishes first."""
    def handler(signum, frame):
        raise PartTimeout(f"time cap of {seconds:.0f} s reached")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def rounded(value, digits: int = 5):
    """Floats to ``digits`` significant digits (a tiny model's milliseconds stay visible)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


class GpuSampler:
    """NVML utilisation ('percent of time over the past sample period during which one or more kernels was
    executing') sampled every ``interval`` s in a thread; ``busy(t0, t1)`` is the mean over a window."""

    def __init__(self, device: torch.device, interval: float = 0.05) -> None:
        self.samples: list[tuple[float, int]] = []
        self.method = None
        self.reason = None
        self.stop = threading.Event()
        if device.type != "cuda":
            self.reason = "no CUDA device: not measured"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            pynvml.nvmlDeviceGetUtilizationRates(handle)
            self.read = lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            self.method = f"NVML nvmlDeviceGetUtilizationRates().gpu sampled every {interval * 1000:.0f} ms"
        except Exception as exc:  # noqa: BLE001 - any NVML failure: try torch's wrapper, else report why
            try:
                torch.cuda.utilization(device)
                self.read = lambda: torch.cuda.utilization(device)
                self.method = f"torch.cuda.utilization sampled every {interval * 1000:.0f} ms"
            except Exception as exc2:  # noqa: BLE001
                self.reason = f"no NVML: {exc!r}; torch.cuda.utilization: {exc2!r}"
                return
        self.thread = threading.Thread(target=self.loop, args=(interval,), daemon=True)
        self.thread.start()

    def loop(self, interval: float) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append((time.perf_counter(), int(self.read())))
            time.sleep(interval)

    def busy(self, t0: float, t1: float) -> float | None:
        values = [u for t, u in list(self.samples) if t0 <= t <= t1]
        return sum(values) / len(values) / 100 if values else None

    def close(self) -> None:
        self.stop.set()


SAMPLER: GpuSampler | None = None


def busy(t0: float, t1: float) -> float | None:
    return SAMPLER.busy(t0, t1) if SAMPLER is not None and SAMPLER.method else None


# -- models, tokenizers and data made in code --------------------------------------------------------------------
def word_tokenizer(vocab_size: int, encoder: bool):
    """A word-level fast tokenizer: token 'w<i>' is id i. Encoder: RoBERTa's specials and pair template (one
    segment, no token types); decoder: LLaMA's (<unk> 0, <s> 1, </s> 2), BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"] if encoder else ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if encoder:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B:0 </s>:0", special_tokens=[("<s>", 0), ("</s>", 2)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])


def build_folder(kind: str, shape: str, folder: Path, device: torch.device, dtype: torch.dtype) -> dict:
    """A random model of ``shape`` and its tokenizer saved in ``folder``; returns what it took."""
    from transformers import LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaModel

    start = time.perf_counter()
    torch.manual_seed(0)
    spec = SHAPES[shape]
    if kind == "encoder":
        config = RobertaConfig(**spec, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                               bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
        with torch.device(device):
            model = RobertaModel(config, add_pooling_layer=False)
    else:
        config = LlamaConfig(**spec, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # a 7B model initialised in fp32 would take twice the memory first
        try:
            with torch.device(device):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
    model.to(dtype)
    built = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    word_tokenizer(spec["vocab_size"], kind == "encoder").save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    free_memory()
    return {"build_seconds": built, "save_seconds": time.perf_counter() - start - built, "parameters": params,
            "saved_dtype": str(dtype).removeprefix("torch."), "folder_gib": folder_gib(folder)}


def folder_gib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30


def words(rng: np.random.Generator, count: int, vocab_size: int, first: int) -> str:
    return " ".join(f"w{i}" for i in rng.integers(first, vocab_size, size=max(count, 1)))


def glue_examples(task: str, n: int, vocab_size: int, seed: int) -> list:
    """``n`` synthetic examples of a GLUE task's text lengths, labels balanced."""
    from fedlease.data.tasks import Example

    rng = np.random.default_rng(seed)
    mean_a, mean_b = GLUE_LENGTHS[task]
    out = []
    for i in range(n):
        a = words(rng, int(rng.gamma(4.0, mean_a / 4.0)), vocab_size, 4)
        b = None if mean_b is None else words(rng, int(rng.gamma(4.0, mean_b / 4.0)), vocab_size, 4)
        out.append(Example(a, b, i % 2))
    return out


def instruction_examples(n: int, vocab_size: int, max_length: int, seed: int) -> list:
    """``n`` synthetic instruction examples: a prompt of 40-70% of ``max_length`` words, a response of 15-30%."""
    from fedlease.data.instructions import InstructionExample

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = int(rng.uniform(0.4, 0.7) * max_length)
        response = int(rng.uniform(0.15, 0.3) * max_length)
        out.append(InstructionExample(words(rng, prompt, vocab_size, 3), "", words(rng, response, vocab_size, 3), 0))
    return out


# -- measuring the package's own calls ---------------------------------------------------------------------------
def batch_widths(data, batch_size: int, seed: int, epochs: int) -> tuple[int, int, int]:
    """(batches, padded tokens, real tokens) of ``epochs`` of ``LocalClient.fit``'s batches with ``seed``."""
    from fedlease.train import batch_indices, round_up

    order = torch.Generator().manual_seed(seed)
    lengths = data.example_lengths
    rows_width = data.input_ids.shape[1]
    batches = padded = 0
    for _ in range(epochs):
        for index in batch_indices(lengths, batch_size, order):
            width = min(round_up(int(lengths[index].max())), rows_width)
            texts = 1 if getattr(data, "second", None) is None else 2
            batches, padded = batches + 1, padded + texts * len(index) * width
    return batches, padded, epochs * int(lengths.sum())


class Calls:
    """Wraps package functions in this process to time them (nothing in the package changes)."""

    def __init__(self) -> None:
        self.log: list[dict] = []
        self.undo: list = []

    def wrap(self, owner, name: str, what: str, describe=None) -> None:
        original = getattr(owner, name)
        calls = self

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            result = original(*args, **kwargs)
            t1 = time.perf_counter()
            row = {"what": what, "t0": t0, "t1": t1, "seconds": t1 - t0}
            if describe is not None:
                row.update(describe(args, kwargs, result))
            calls.log.append(row)
            return result

        setattr(owner, name, wrapper)
        self.undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self.undo):
            setattr(owner, name, original)
        self.undo.clear()

    def rows(self, what: str, t0: float = -math.inf, t1: float = math.inf) -> list[dict]:
        return [r for r in self.log if r["what"] == what and r["t0"] >= t0 and r["t1"] <= t1]


def describe_fit(args, kwargs, result) -> dict:
    client, parts = args[0], args[1]
    seed = kwargs.get("seed", args[2] if len(args) > 2 else None)
    epochs = kwargs.get("epochs", args[3] if len(args) > 3 else None) or client.settings.epochs
    batches, padded, real = batch_widths(client.train_data, client.settings.batch_size, seed, epochs)
    return {"client": client.client_id, "parts": list(parts), "layout": client.adapted.layout.routing,
            "experts": client.adapted.layout.num_experts, "steps": int(result["steps"]),
            "examples": int(result["examples"]), "padded_tokens": padded, "tokens": real}


def fit_summary(rows: list[dict], flops_per_padded_token: float | None) -> dict | None:
    if not rows:
        return None
    seconds = sum(r["seconds"] for r in rows)
    steps = sum(r["steps"] for r in rows)
    padded = sum(r["padded_tokens"] for r in rows)
    out = {"fits": len(rows), "seconds_per_fit": seconds / len(rows), "steps": steps,
           "seconds_per_step": seconds / max(steps, 1), "examples_per_s": sum(r["examples"] for r in rows) / seconds,
           "tokens_per_s": sum(r["tokens"] for r in rows) / seconds, "padded_tokens_per_s": padded / seconds,
           "gpu_busy": busy(min(r["t0"] for r in rows), max(r["t1"] for r in rows))}
    if flops_per_padded_token:
        tflops = flops_per_padded_token * padded / seconds / 1e12
        out.update(achieved_tflops=tflops, fraction_of_peak=tflops / PEAK_BF16_TFLOPS)
    return out


def counted_epoch_flops(client, parts) -> dict:
    """FLOPs of one epoch of ``client``'s local training (forward + backward, as ``fit`` runs it), counted by
    ``torch.utils.flop_counter`` on its real batches; per padded token."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedlease.train import batch_indices

    settings, data = client.settings, client.train_data
    params = client.adapted.set_trainable(parts)
    model = client.adapted.model
    model.train()
    total = 0
    counter = FlopCounterMode(display=False)
    with counter:
        for index in batch_indices(data.example_lengths, settings.batch_size, torch.Generator().manual_seed(0)):
            with settings.autocast():
                loss = client.batch_loss(data, index)
            loss.backward()
    total = counter.get_total_flops()
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    model.eval()
    _, padded, real = batch_widths(data, settings.batch_size, 0, 1)
    return {"flops_per_epoch": total, "padded_tokens_per_epoch": padded, "tokens_per_epoch": real,
            "flops_per_padded_token": total / max(padded, 1)}


def linear_params(model: torch.nn.Module, exclude: tuple[str, ...] = ()) -> int:
    """Weights of the matrix products a token goes through (linear layers, the adapted ones' bases included)."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(e in name for e in exclude):
            total += module.in_features * module.out_features
    return total


def guarded(into: list, fn, *args) -> None:
    """Append ``fn(*args)``, or why it failed (a profiler that does not work here costs only its row)."""
    try:
        into.append(fn(*args))
    except PartTimeout:
        raise
    except Exception as exc:  # noqa: BLE001
        into.append({"label": str(args[-1]), "error": f"{type(exc).__name__}: {str(exc)[:300]}"})


def profile_fit(client, parts, label: str) -> dict:
    """aten operator calls, CUDA kernels and kernel time per training step of ``fit`` (2 steps) under
    torch.profiler; busy = union of kernel intervals / wall time of the profiled fit (the profiler's own host
    cost lowers it)."""
    from torch.profiler import ProfilerActivity, profile

    device = client.settings.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        metrics = client.fit(parts, seed=1, epochs=1)
        sync(device)
    wall = time.perf_counter() - t0
    steps = max(int(metrics["steps"]), 1)
    events = prof.events()
    aten = sum(1 for e in events if e.name.startswith("aten::") and e.device_type.name == "CPU")
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    out = {"label": label, "steps": steps, "aten_calls_per_step": aten / steps, "wall_seconds_per_step": wall / steps}
    if kernels:
        spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
        union, cur_s, cur_e = 0.0, *spans[0]
        for s, e in spans[1:]:
            if s > cur_e:
                union, cur_s, cur_e = union + cur_e - cur_s, s, e
            else:
                cur_e = max(cur_e, e)
        union += cur_e - cur_s
        out.update(cuda_kernels_per_step=len(kernels) / steps, kernel_ms_per_step=union / 1e3 / steps,
                   kernel_busy_under_profiler=min(union / 1e6 / wall, 1.0))
    return out


# -- part 1: the encoder, whole rounds of the runner ------------------------------------------------------------
def encoder_part(p: dict, device: torch.device, scratch: Path, result: dict) -> None:
    from fedlease.config import RunConfig
    from fedlease.data.partition import ClientSplit
    from fedlease.methods import create_method
    from fedlease.methods import fedlease as fedlease_module
    from fedlease.methods.fedlease import ADAPTIVE_PARTS, WARMUP_PARTS, FedLease
    from fedlease.report.artifacts import RunRecorder
    from fedlease.runtime import simulation
    from fedlease.runtime.clients import client_infos, load_shared_backbone, local_client, train_settings
    from fedlease.runtime.loop import Federation
    from fedlease.train import LocalClient

    folder = scratch / "encoder"
    dtype = torch.float32  # a pretrained encoder checkpoint's weights; load_backbone keeps them fp32 (autocast)
    result["model"] = {"shape": p["shape"], **SHAPES[p["shape"]], **build_folder("encoder", p["shape"], folder,
                                                                                     device, dtype)}
    tasks = [GLUE_TASKS[i % len(GLUE_TASKS)] for i in range(p["clients"])]
    config = simulation.prepare_config(RunConfig(
        model_name=str(folder), tasks=tasks, train_samples=p["train"], test_samples=p["test"], batch_size=p["batch"],
        local_epochs=p["epochs"], global_rounds=25, warmup_rounds=p["warmup"], num_experts=p["experts"],
        max_length=p["max_length"], device=device.type, output_dir=str(scratch / "encoder_run"),
        pair_encoding="joint", precision=p["precision"]))
    result["config"] = {k: getattr(config, k) for k in ("tasks", "train_samples", "test_samples", "batch_size",
                                                        "local_epochs", "warmup_rounds", "num_experts", "rank",
                                                        "max_length", "eval_batch_size", "allocation", "precision")}
    reset_peak(device)
    t0 = time.perf_counter()
    backbone = load_shared_backbone(config)
    settings = train_settings(config, backbone)
    result["load_seconds"] = time.perf_counter() - t0
    result["precision"] = str(settings.amp_dtype or "fp32").removeprefix("torch.")
    vocab = SHAPES[p["shape"]]["vocab_size"]
    t0 = time.perf_counter()
    splits = [ClientSplit(cid, task, glue_examples(task, p["train"], vocab, 10 + cid),
                          glue_examples(task, p["test"], vocab, 1000 + cid), 0) for cid, task in enumerate(tasks)]
    clients = [local_client(config, backbone, settings, split) for split in splits]
    result["tokenise_seconds"] = time.perf_counter() - t0
    result["mean_tokens_per_example"] = {c.spec.name: float(c.train_data.example_lengths.float().mean())
                                         for c in clients}
    infos = client_infos(config)
    method = create_method(config, infos)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"model_source": backbone.source, "device": str(device), "precision": result["precision"]}
    recorder = RunRecorder(out, config, infos, info)
    transport = simulation.InProcessTransport(method, clients, False, config.global_rounds)
    federation = Federation(config, method, transport, recorder, out, info)

    calls = Calls()
    calls.wrap(LocalClient, "fit", "fit", describe_fit)
    calls.wrap(fedlease_module, "data_signature", "signature")
    calls.wrap(simulation.InProcessTransport, "train", "train")
    calls.wrap(simulation.InProcessTransport, "evaluate", "evaluate")
    calls.wrap(FedLease, "allocate", "allocate")
    calls.wrap(FedLease, "aggregate_train", "aggregate")
    calls.wrap(Federation, "checkpoint", "checkpoint")
    calls.wrap(RunRecorder, "record_round", "artifacts")
    rounds = result["rounds"] = []
    try:
        for rnd in range(p["rounds"]):
            sync(device)
            t0 = time.perf_counter()
            federation.round(rnd)
            sync(device)
            t1 = time.perf_counter()
            row = {"round": rnd + 1, "phase": "warmup" if rnd < p["warmup"] else "adaptive", "seconds": t1 - t0,
                   "gpu_busy": busy(t0, t1), "_t0": t0, "_t1": t1}
            for what in ("train", "evaluate", "signature", "allocate", "aggregate", "checkpoint", "artifacts"):
                row[f"{what}_seconds"] = sum(r["seconds"] for r in calls.rows(what, t0, t1))
            row["aggregate_seconds"] -= row["allocate_seconds"]
            fits = calls.rows("fit", t0, t1)
            row["fit_seconds"] = sum(r["seconds"] for r in fits)
            row["steps"] = sum(r["steps"] for r in fits)
            row["seconds_per_step"] = row["fit_seconds"] / max(row["steps"], 1)
            row["fit_gpu_busy"] = busy(fits[0]["t0"], fits[-1]["t1"]) if fits else None
            rounds.append(row)
            result["peak_memory_gib"] = peak_gib(device)
            log(f"  encoder round {rnd + 1} ({row['phase']}): {row['seconds']:.2f} s, "
                f"{row['seconds_per_step'] * 1000:.1f} ms/step, busy {fmt_pct(row['gpu_busy'])}")
    finally:
        calls.restore()
    result["peak_memory_gib"] = peak_gib(device)

    # FLOPs of an epoch, counted, in both layouts (the model is in the last client's adaptive layout now)
    client = clients[0]
    adaptive_layout = client.adapted.layout
    counted = {"adaptive": counted_epoch_flops(client, ADAPTIVE_PARTS)}
    client.adapted.configure(replace(adaptive_layout, num_experts=1, own_expert=0, routing="none"))
    counted["warmup"] = counted_epoch_flops(client, WARMUP_PARTS)
    result["counted_flops"] = counted
    model = backbone.adapted.model
    n_linear = linear_params(model)
    spec = SHAPES[p["shape"]]
    result["flops_formula"] = {
        "linear_parameters": n_linear,
        "per_padded_token_frozen_formula": 4 * n_linear,
        "note": "training with frozen weights: 4 x N x tokens (forward 2N, backward input gradients 2N, no weight "
                "gradients), N = weights of all linear layers; attention scores add 12 x layers x hidden x width "
                "per token (QK^T and AV, forward + 2x backward); the 6 x N x tokens convention (trained weights) "
                "would be 1.5x the frozen figure",
        "attention_per_token_at_mean_width": 12 * spec["num_hidden_layers"] * spec["hidden_size"]
        * float(np.mean([c.train_data.example_lengths.float().mean() for c in clients])),
    }

    # profile two steps of each layout on a 2-batch copy of client 0 (op counts per step)
    small = LocalClient(client.client_id, client.spec, client.adapted,
                        client.train_data.subset(torch.arange(min(2 * p["batch"], len(client.train_data)))),
                        client.test_data, client.settings)
    result["profile"] = []
    guarded(result["profile"], profile_fit, small, WARMUP_PARTS, "warmup (plain LoRA)")
    client.adapted.configure(adaptive_layout)
    guarded(result["profile"], profile_fit, small, ADAPTIVE_PARTS, f"adaptive ({adaptive_layout.num_experts} experts)")

    # summaries
    by_phase = {"warmup": [r for r in rounds if r["phase"] == "warmup"],
                "adaptive": [r for r in rounds if r["phase"] == "adaptive"]}
    steady_warm = [r for r in by_phase["warmup"] if r["signature_seconds"] == 0 and r["allocate_seconds"] == 0]
    steady_adapt = by_phase["adaptive"][1:] or by_phase["adaptive"]
    fits = [r for r in calls.log if r["what"] == "fit"]
    warm_fits = [r for r in fits if in_rounds(r, steady_warm)]
    adapt_fits = [r for r in fits if in_rounds(r, steady_adapt)]
    result["warmup_training"] = fit_summary(warm_fits, counted["warmup"]["flops_per_padded_token"])
    result["adaptive_training"] = fit_summary(adapt_fits, counted["adaptive"]["flops_per_padded_token"])
    n = p["clients"]
    warm_round = statistics.mean(r["seconds"] for r in steady_warm) if steady_warm else None
    adapt_round = statistics.mean(r["seconds"] for r in steady_adapt) if steady_adapt else None
    signature = [r["seconds"] for r in calls.log if r["what"] == "signature"]
    alloc_round = next((r for r in by_phase["warmup"] if r["allocate_seconds"] > 0), None)
    result["per_round"] = {
        "clients": n, "warmup_round_seconds": warm_round, "adaptive_round_seconds": adapt_round,
        "adaptive_over_warmup_round": adapt_round / warm_round if warm_round and adapt_round else None,
        "adaptive_over_warmup_step": (result["adaptive_training"]["seconds_per_step"]
                                      / result["warmup_training"]["seconds_per_step"])
        if result["warmup_training"] and result["adaptive_training"] else None,
        "warmup_round_gpu_busy": mean_or_none(r["gpu_busy"] for r in steady_warm),
        "adaptive_round_gpu_busy": mean_or_none(r["gpu_busy"] for r in steady_adapt),
        "signature_seconds_per_client": statistics.mean(signature) if signature else None,
        "allocation_seconds": alloc_round["allocate_seconds"] if alloc_round else None,
    }
    if warm_round and adapt_round:
        scale = PAPER_GLUE["clients"] / n
        examples = PAPER_GLUE["train_examples"] / p["train"]  # 1 at the paper's size; --quick scales its tiny run
        sig = (result["per_round"]["signature_seconds_per_client"] or 0.0) * PAPER_GLUE["clients"] * examples
        alloc = result["per_round"]["allocation_seconds"] or 0.0
        warm_total = scale * examples * warm_round * PAPER_GLUE["warmup_rounds"]
        adapt_total = scale * examples * adapt_round * (PAPER_GLUE["rounds"] - PAPER_GLUE["warmup_rounds"])
        result["paper_glue_extrapolated"] = {
            "setting": PAPER_GLUE, "minutes": (warm_total + adapt_total + sig + alloc) / 60,
            "warmup_minutes": warm_total / 60, "adaptive_minutes": adapt_total / 60, "signature_minutes": sig / 60,
            "measured_examples_per_client": p["train"], "examples_scale": examples,
            "formula": f"(16/{n}) x (5 x steady warmup round + 20 x steady adaptive round) of {n} clients x "
                       f"{p['train']} examples (x {examples:g} to reach 1000 examples) + 16 x data signature per "
                       f"client + the allocation; a round is a sequence of per-client trainings and evaluations, so "
                       f"its time scales with the clients",
            "goal_minutes": 7.0,
        }


def in_rounds(row: dict, rounds: list[dict]) -> bool:
    """Whether the call ``row`` ran inside one of ``rounds``."""
    return any(r["_t0"] <= row["t0"] and row["t1"] <= r["_t1"] for r in rounds)


def mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


# -- parts 2 and 3: decoders, client by client ------------------------------------------------------------------
def decoder_part(p: dict, device: torch.device, folder: Path, quantization: str, result: dict) -> None:
    """One GenerationClient's warmup and adaptive training, signature, generation and loss; a round estimated."""
    from fedlease.config import RunConfig
    from fedlease.runtime.simulation import prepare_config

    task = "instruct_struct2text"
    config = prepare_config(RunConfig(
        model_name=str(folder), tasks=[task] * p["clients"], train_samples=p["train"], test_samples=p["test"],
        batch_size=p["batch"], local_epochs=p["epochs"], max_length=p["max_length"], max_new_tokens=p["new_tokens"],
        device=device.type, quantization=quantization, global_rounds=25, warmup_rounds=5, precision=p["precision"],
        output_dir=str(folder.parent / "unused")))
    result["config"] = {k: getattr(config, k) for k in ("train_samples", "test_samples", "batch_size", "local_epochs",
                                                        "max_length", "max_new_tokens", "rank", "quantization",
                                                        "eval_batch_size")}
    reset_peak(device)
    logged = CountingHandler()
    root = logging.getLogger()
    root.addHandler(logged)  # also keeps a message logged per call out of the console (no last-resort print)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            decoder_steps(p, device, config, folder, result)
        finally:
            root.removeHandler(logged)
            messages = [str(w.message) for w in caught] + logged.messages
            result["warnings"] = {
                "python_warnings": len(caught), "log_records_warning_or_above": len(logged.messages),
                "MatMul8bitLt_cast": sum("MatMul8bitLt" in m for m in messages),
                "distinct": sorted({m[:160] for m in messages})[:6]}


class CountingHandler(logging.Handler):
    """Keeps the messages of log records of WARNING and above (bitsandbytes logs rather than warns)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def decoder_steps(p: dict, device: torch.device, config, folder: Path, result: dict) -> None:
    from fedlease.data.tasks import get_spec
    from fedlease.generation import GenerationClient, encode_instructions
    from fedlease.methods.base import ClientInfo, Instruction
    from fedlease.methods.fedlease import ADAPTIVE_PARTS, FedLease, data_signature
    from fedlease.model.experts import ExpertLayout
    from fedlease.runtime.clients import load_shared_backbone, train_settings
    from fedlease.train import LocalClient

    task = config.tasks[0]
    t0 = time.perf_counter()
    backbone = load_shared_backbone(config)
    sync(device)
    result["load_seconds"] = time.perf_counter() - t0
    result["weights_gib"] = allocated_gib(device)
    settings = train_settings(config, backbone)
    result["precision"] = str(settings.amp_dtype or "fp32").removeprefix("torch.")
    result["frozen_weights"] = config.quantization if config.quantization != "none" else str(
        next(backbone.adapted.model.parameters()).dtype).removeprefix("torch.")
    vocab = SHAPES_BY_FOLDER[str(folder)]["vocab_size"]
    t0 = time.perf_counter()
    tok = backbone.tokenizer
    train = encode_instructions(tok, instruction_examples(p["train"], vocab, p["max_length"], 1), p["max_length"])
    test_ex = instruction_examples(p["test"], vocab, p["max_length"], 2)
    test = encode_instructions(tok, test_ex, p["max_length"], answers_like=test_ex)
    result["tokenise_seconds"] = time.perf_counter() - t0
    result["mean_tokens_per_example"] = float(train.lengths.float().mean())
    client = GenerationClient(0, get_spec(task), backbone.adapted, train, test, settings, tok, p["new_tokens"])
    method = FedLease(config, [ClientInfo(i, task, ()) for i in range(p["clients"])])
    calls = Calls()
    calls.wrap(LocalClient, "fit", "fit", describe_fit)
    try:
        # warmup (plain LoRA) twice: the first is cold; then FedLEASE's adaptive layout twice
        warm = method.warmup_instruction()
        warm.extra = {}  # the data signature is timed on its own below
        layout = ExpertLayout(num_experts=p["experts"], own_expert=0, routing="adaptive")
        backbone.adapted.configure(layout)
        gen = torch.Generator().manual_seed(0)
        state = {name: 0.02 * torch.randn(t.shape, generator=gen)
                 for name, t in backbone.adapted.tensors(["lora_A", "lora_B", "router", "experts"]).items()}
        adaptive = Instruction(layout, state, train=ADAPTIVE_PARTS, upload=ADAPTIVE_PARTS)
        for label, ins in (("warmup_cold", warm), ("warmup", warm), ("adaptive_cold", adaptive),
                           ("adaptive", adaptive)):
            store: dict = {}
            method.client_train(client, ins, 0, store)
            fit = calls.log[-1]
            result[f"{label}_fit"] = {"seconds": fit["seconds"], "steps": fit["steps"],
                                      "seconds_per_step": fit["seconds"] / max(fit["steps"], 1),
                                      "tokens_per_s": fit["tokens"] / fit["seconds"],
                                      "gpu_busy": busy(fit["t0"], fit["t1"])}
            log(f"  {label}: {fit['seconds']:.2f} s, {result[f'{label}_fit']['seconds_per_step'] * 1000:.1f} "
                f"ms/step")
    finally:
        calls.restore()
    result["peak_memory_gib_training"] = peak_gib(device)
    if config.quantization == "none":
        counted = counted_epoch_flops(client, ADAPTIVE_PARTS)
        FLOPS_BY_FOLDER[str(folder)] = counted
    else:  # the flop counter does not see bitsandbytes' products: the same shape's bf16 count stands in
        counted = FLOPS_BY_FOLDER.get(str(folder))
        if counted is None:
            counted = counted_epoch_flops(client, ADAPTIVE_PARTS)
        counted = {**counted, "note": "counted on the bf16 model of this shape (bitsandbytes' products are "
                                      "invisible to torch.utils.flop_counter); the same products run here"}
    result["counted_flops"] = counted
    fit = calls.log[-1]
    sec = fit["seconds"]
    tflops = counted["flops_per_padded_token"] * fit["padded_tokens"] / sec / 1e12
    result["adaptive_fit"].update(achieved_tflops=tflops, fraction_of_peak=tflops / PEAK_BF16_TFLOPS,
                                  examples_per_s=fit["examples"] / sec)
    model = backbone.adapted.model
    n_body = linear_params(model, exclude=("lm_head",))
    head = model.get_output_embeddings()
    result["flops_formula"] = {
        "linear_parameters_body": n_body, "lm_head_parameters": head.weight.numel(),
        "note": "training, frozen weights: 4 x N_body x tokens + 4 x N_head x response tokens (the LM head runs "
                "on response positions only) + attention 12 x layers x hidden x width per token; counted FLOPs "
                "(torch.utils.flop_counter, one real epoch) are what the achieved TFLOP/s uses"}

    # the data signature (embedding allocation), generation and the teacher-forced loss, as evaluation runs
    t0 = time.perf_counter()
    data_signature(client, config.seed, 1)
    sync(device)
    result["signature_seconds"] = time.perf_counter() - t0
    generated = {}
    original = model.generate

    def counting_generate(*args, **kwargs):
        out = original(*args, **kwargs)
        generated["rows"], generated["new"] = out.shape[0], out.shape[1] - kwargs["input_ids"].shape[1]
        return out

    model.generate = counting_generate
    try:
        backbone.adapted.configure(layout)
        backbone.adapted.load_state(state)
        timings = {}
        for label, new_tokens in (("cold", 2), ("one", 1), ("full", p["new_tokens"])):
            client.max_new_tokens = new_tokens
            sync(device)
            t0 = time.perf_counter()
            responses = client.generate(test)
            sync(device)
            timings[label] = (time.perf_counter() - t0, dict(generated), t0)
        full_s, full, t_full = timings["full"]
        one_s = timings["one"][0]
        result["generation"] = {
            "prompts": full["rows"], "new_tokens": full["new"], "seconds": full_s,
            "seconds_first_token": one_s,
            "seconds_per_token_step": (full_s - one_s) / max(full["new"] - 1, 1) if full_s > one_s else None,
            "seconds_per_token_overall": full_s / max(full["new"], 1),
            "gpu_busy": busy(t_full, t_full + full_s),
            "layout": f"adaptive, {p['experts']} experts"}
        log(f"  generation: {full['rows']} prompts x {full['new']} tokens in {full_s:.2f} s, "
            f"{result['generation']['seconds_per_token_overall'] * 1000:.1f} ms per token (prefill included)")
        dynamic_responses = responses
    finally:
        model.generate = original
        client.max_new_tokens = p["new_tokens"]
    t0 = time.perf_counter()
    client.mean_loss(test)
    result["eval_loss_seconds"] = time.perf_counter() - t0
    result["peak_memory_gib"] = peak_gib(device)  # before the static cache's own memory (and CUDA graphs' pools)
    guarded(static := [], static_generation, client, test, dynamic_responses, full_s)
    result["generation_static"] = static[0]
    steps_per_epoch = math.ceil(p["train"] / p["batch"])
    epochs = p.get("round_epochs", p["epochs"])
    adaptive_fit = result["adaptive_fit"]["seconds_per_step"] * steps_per_epoch * epochs
    gen = result["generation"]
    evaluate = gen["seconds"] + result["eval_loss_seconds"]
    result["round_estimate"] = {
        "clients": p["clients"], "adaptive_round_seconds": p["clients"] * (adaptive_fit + evaluate),
        "first_round_extra_signature_seconds": p["clients"] * result["signature_seconds"],
        "formula": f"{p['clients']} clients x (local training: {epochs} epochs x {steps_per_epoch} steps x the "
                   f"adaptive step time + evaluation: generation of {gen['prompts']} test prompts x {gen['new_tokens']}"
                   f" tokens + the teacher-forced loss); the warmup rounds add the data signature once per client"}

    # op counts per step: one step of each layout (first batch), and per generated token
    first = train.subset(torch.arange(min(p["batch"], p["train"])))
    small = GenerationClient(0, client.spec, client.adapted, first, test, settings, tok, p["new_tokens"])
    result["profile"] = []
    backbone.adapted.configure(ExpertLayout())
    guarded(result["profile"], profile_fit, small, ("lora_A", "lora_B"), "warmup (plain LoRA)")
    backbone.adapted.configure(layout)
    backbone.adapted.load_state(state)
    guarded(result["profile"], profile_fit, small, ADAPTIVE_PARTS, f"adaptive ({p['experts']} experts)")
    guarded(result["profile"], profile_generate, client, test, min(8, p["new_tokens"]))


def static_generation(client, test, dynamic: list[str], dynamic_seconds: float) -> dict:
    """--generation_cache static on the same prompts: the first call (on CUDA transformers compiles the decoding
    step then, once per batch shape) and a second, timed alone; and how many responses equal the dynamic cache's
    (compiled kernels may round differently in bf16)."""
    device = client.settings.device
    client.cache = "static"
    seconds = []
    try:
        for _ in range(2):
            sync(device)
            t0 = time.perf_counter()
            responses = client.generate(test)
            sync(device)
            seconds.append(time.perf_counter() - t0)
    finally:
        client.cache = "dynamic"
    # transformers compiles a static cache's decoding step on CUDA by itself (not measured here: its rule)
    return {"label": "generation, --generation_cache static", "compiled_by_transformers": device.type == "cuda",
            "seconds_first_call": seconds[0], "seconds": seconds[1],
            "speedup_over_dynamic": dynamic_seconds / seconds[1] if seconds[1] > 0 else None,
            "same_responses": sum(a == b for a, b in zip(responses, dynamic, strict=True)) / max(len(dynamic), 1)}


SHAPES_BY_FOLDER: dict[str, dict] = {}
FLOPS_BY_FOLDER: dict[str, dict] = {}


def profile_generate(client, test, new_tokens: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    device = client.settings.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    before, client.max_new_tokens = client.max_new_tokens, new_tokens
    try:
        with profile(activities=activities) as prof:
            client.generate(test)
            sync(device)
    finally:
        client.max_new_tokens = before
    events = prof.events()
    aten = sum(1 for e in events if e.name.startswith("aten::") and e.device_type.name == "CPU")
    kernels = sum(1 for e in events if e.device_type.name == "CUDA")
    out = {"label": f"generation of {new_tokens} tokens (prefill included)",
           "aten_calls_per_token": aten / new_tokens}
    if kernels:
        out["cuda_kernels_per_token"] = kernels / new_tokens
    return out


# -- the run -----------------------------------------------------------------------------------------------------
def fmt_pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def device_info(device: torch.device) -> dict:
    import transformers

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception as exc:  # noqa: BLE001 - absent, or present and broken: either way say why
        info["bitsandbytes"] = None
        info["bitsandbytes_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        with contextlib.suppress(Exception):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
    return info


def measured_matmul_tflops(device: torch.device) -> float | None:
    """bf16 8192^3 product, median of 20 timed with CUDA events, on random data."""
    if device.type != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    free_memory()
    return 2 * n**3 / statistics.median(times) / 1e12


def scratch_folder(min_free_gib: float) -> Path:
    """/dev/shm when it has room (the 7B folder is 13 GB), else the temp folder."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        with contextlib.suppress(OSError):
            if shutil.disk_usage(shm).free / 2**30 > min_free_gib:
                return Path(tempfile.mkdtemp(prefix="fedlease-gpu-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="fedlease-gpu-"))


def run_part(name: str, cap: float, deadline: float, results: dict, out: Path | None, fn, *args) -> dict:
    part: dict = {"status": "running"}
    results["parts"][name] = part
    left = deadline - time.perf_counter()
    if left < 5:
        part.update(status="skipped", reason="the benchmark's time budget was spent")
        write(results, out)
        return part
    cap = min(cap, left)
    part["time_cap_seconds"] = cap
    log(f"[{name}] (cap {cap:.0f} s)")
    t0 = time.perf_counter()
    try:
        with time_cap(cap):
            fn(*args, part)
        part["status"] = "ok"
    except PartTimeout as exc:
        part.update(status="timeout", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - a part's failure is data; the others still run
        part.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:400]}",
                    traceback=traceback.format_exc()[-2000:])
        log(traceback.format_exc())
    part["seconds"] = time.perf_counter() - t0
    log(f"[{name}] {part['status']} in {part['seconds']:.1f} s" + (f": {part.get('reason')}"
                                                                     if part["status"] != "ok" else ""))
    free_memory()
    write(results, out)
    return part


def write(results: dict, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        tmp.write_text(json.dumps(rounded(clean(results)), indent=1) + "\n")
        os.replace(tmp, out)


def clean(value):
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def summary(results: dict) -> dict:
    parts = results["parts"]
    s: dict = {}
    enc = parts.get("encoder", {})
    if enc.get("per_round"):
        pr = enc["per_round"]
        s["encoder_warmup_round_seconds"] = pr["warmup_round_seconds"]
        s["encoder_adaptive_round_seconds"] = pr["adaptive_round_seconds"]
        s["encoder_clients_per_round"] = pr["clients"]
        s["encoder_warmup_round_gpu_busy"] = pr["warmup_round_gpu_busy"]
        s["encoder_adaptive_round_gpu_busy"] = pr["adaptive_round_gpu_busy"]
        for phase in ("warmup", "adaptive"):
            t = enc.get(f"{phase}_training") or {}
            s[f"encoder_{phase}_seconds_per_step"] = t.get("seconds_per_step")
            s[f"encoder_{phase}_examples_per_s"] = t.get("examples_per_s")
            s[f"encoder_{phase}_tokens_per_s"] = t.get("tokens_per_s")
            s[f"encoder_{phase}_achieved_tflops"] = t.get("achieved_tflops")
            s[f"encoder_{phase}_training_gpu_busy"] = t.get("gpu_busy")
        s["encoder_signature_seconds_per_client"] = pr["signature_seconds_per_client"]
        s["encoder_peak_memory_gib"] = enc.get("peak_memory_gib")
    if enc.get("paper_glue_extrapolated"):
        s["paper_glue_minutes"] = enc["paper_glue_extrapolated"]["minutes"]
    for name in ("decoder_135m", "llama7b_bf16", "llama7b_4bit", "llama7b_8bit"):
        d = parts.get(name, {})
        if d.get("adaptive_fit"):
            s[f"{name}_warmup_seconds_per_step"] = d["warmup_fit"]["seconds_per_step"]
            s[f"{name}_adaptive_seconds_per_step"] = d["adaptive_fit"]["seconds_per_step"]
            s[f"{name}_adaptive_tokens_per_s"] = d["adaptive_fit"]["tokens_per_s"]
            s[f"{name}_adaptive_achieved_tflops"] = d["adaptive_fit"].get("achieved_tflops")
            s[f"{name}_adaptive_training_gpu_busy"] = d["adaptive_fit"]["gpu_busy"]
        if d.get("generation"):
            s[f"{name}_seconds_per_token_step"] = d["generation"]["seconds_per_token_step"]
        if (static := d.get("generation_static") or {}).get("seconds"):
            s[f"{name}_static_cache_generation_speedup"] = static["speedup_over_dynamic"]
            s[f"{name}_static_cache_first_call_seconds"] = static["seconds_first_call"]
        if d.get("round_estimate"):
            s[f"{name}_round_seconds_estimate"] = d["round_estimate"]["adaptive_round_seconds"]
        if d.get("peak_memory_gib") is not None:
            s[f"{name}_peak_memory_gib"] = d["peak_memory_gib"]
        s[f"{name}_status"] = d.get("status")
    s["encoder_status"] = enc.get("status")
    return s


def table(results: dict) -> str:
    lines = [f"{'quantity':58s} value"]
    for key, value in results["summary"].items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"{key:58s} {value}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (the test suite's run)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CUDA when present (cpu with --quick)")
    parser.add_argument("--out", default=None, help="also write the JSON here, rewritten after each part")
    parser.add_argument("--parts", nargs="+", default=["encoder", "decoder", "llama"],
                        choices=("encoder", "decoder", "llama"))
    parser.add_argument("--budget", type=float, default=None, help="seconds for all parts together")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    for part in ("encoder", "decoder", "llama"):
        plan[part]["precision"] = plan["precision"]
    if args.device == "auto":
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    budget = args.budget or plan["budget"]
    start = time.perf_counter()
    deadline = start + budget
    out = Path(args.out) if args.out else None
    import transformers

    transformers.logging.set_verbosity_error()
    global SAMPLER
    SAMPLER = GpuSampler(device)
    results: dict = {
        "benchmark": "gpu", "quick": args.quick, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": device_info(device),
        "peak_bf16_tflops_reference": PEAK_BF16_TFLOPS,
        "gpu_busy_method": SAMPLER.method or SAMPLER.reason,
        "flops_method": "counted: torch.utils.flop_counter.FlopCounterMode over one real epoch of local training "
                        "(forward + backward under autocast, as fit runs it), divided by the padded tokens to get "
                        "FLOPs per padded token, times the padded tokens of the timed fits; the analytic cross-check "
                        "for frozen weights is in each part's flops_formula",
        "time_budget_seconds": budget, "plan": {k: v for k, v in plan.items() if k != "budget"}, "parts": {},
    }
    results["measured_matmul_bf16_tflops"] = measured_matmul_tflops(device)
    write(results, out)
    scratch = scratch_folder(40 if "llama" in args.parts and not args.quick else 1)
    try:
        if "encoder" in args.parts:
            run_part("encoder", plan["encoder"]["cap"], deadline, results, out, encoder_part, plan["encoder"],
                     device, scratch)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if "decoder" in args.parts:
            p = plan["decoder"]
            folder = scratch / "decoder"

            def decoder(p, part):
                part["model"] = {"shape": p["shape"], **SHAPES[p["shape"]],
                                 **build_folder("decoder", p["shape"], folder, device, dtype)}
                SHAPES_BY_FOLDER[str(folder)] = SHAPES[p["shape"]]
                decoder_part(p, device, folder, "none", part)

            run_part("decoder_135m", p["cap"], deadline, results, out, decoder, p)
            shutil.rmtree(folder, ignore_errors=True)
        if "llama" in args.parts:
            p = plan["llama"]
            folder = scratch / "llama"
            built = run_part("llama7b_build", p["build_cap"], deadline, results, out,
                             lambda p, part: part.update(shape=p["shape"], **SHAPES[p["shape"]], **build_folder(
                                 "decoder", p["shape"], folder, device, dtype)), p)
            SHAPES_BY_FOLDER[str(folder)] = SHAPES[p["shape"]]
            for quant, name, cap in (("none", "llama7b_bf16", p["cap"]), ("4bit", "llama7b_4bit", p["quant_cap"]),
                                     ("8bit", "llama7b_8bit", p["quant_cap"] + 15)):
                why = None
                if built["status"] != "ok":
                    why = f"the model folder was not built ({built['status']})"
                elif quant != "none" and device.type != "cuda":
                    why = "--quantization needs CUDA (bitsandbytes)"
                elif quant != "none" and results["machine"].get("bitsandbytes") is None:
                    why = f"bitsandbytes is not importable here ({results['machine'].get('bitsandbytes_error')})"
                if why:
                    results["parts"][name] = {"status": "skipped", "reason": why}
                    continue
                run_part(name, cap, deadline, results, out,
                         lambda p, part, quant=quant: decoder_part(p, device, folder, quant, part), p)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        SAMPLER.close()
    results["total_seconds"] = time.perf_counter() - start
    results["summary"] = summary(results)
    write(results, out)
    print(table(results))
    print(json.dumps(rounded(clean(results))))


if __name__ == "__main__":
    main()
