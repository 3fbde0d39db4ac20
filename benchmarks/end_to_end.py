"""Training throughput of a FedLEASE client in the in-process runner vs a bare PEFT LoRA loop; a round's time split.

1. Throughput: one client's local training in the adaptive phase (M=4 experts, router, head), through the
   runner's own client path (``FederatedMethod.client_train``: load the downloaded state into the shared
   model, train, extract the upload), on the offline MiniLM-L6 encoder and built-in data, batch 32 — against a
   bare loop of upstream PEFT LoRA (rank 4 on query/value, dropout 0.05, AdamW) on a fresh copy of the same
   model, the same tokenised data and batch size, in the same process, interleaved, at the same precision.
   The bare loop runs both on our length-grouped batches (``same batches``: isolates our layer and runner)
   and on plain random batches padded to their longest row (what a bare loop usually does). Both read text pairs
   jointly (``--pair_encoding joint``, what the PEFT sequence-classification model does), so the comparison
   measures the expert layer and the runner, not the reading of pairs.
2. The time split of whole rounds of a short FedLEASE run (8 clients): train, evaluate, cluster, aggregate,
   artifacts + checkpoint.
3. Achieved training FLOP/s (counted with torch.utils.flop_counter on the real batches) and its fraction of
   the machine's peak = cores x clock x FLOP per cycle per core (see ``peak_flops``).

Prints one JSON object as the last line of stdout; ``--quick`` is a smaller run (under a minute on 2 idle cores),
``--model_name`` another encoder (the test suite runs ``--quick`` on a tiny random BERT).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fedlease.config import RunConfig
from fedlease.methods.base import Instruction
from fedlease.methods.fedlease import ADAPTIVE_PARTS, FedLease
from fedlease.model.experts import ExpertLayout
from fedlease.runtime.simulation import build_clients, load_partition, prepare_config
from fedlease.train import batch_indices, make_batch


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def peak_flops(dtype: str) -> dict:
    """cores x clock x FLOP/cycle/core. FLOP/cycle: two FMA pipes x SIMD lanes x 2 (multiply + add); AVX-512 on
    AMD (Zen 4) runs as two 256-bit halves, so 2 x 8 x 2 = 32 fp32; AVX-512 on Intel 2 x 16 x 2 = 64;
    AVX2 2 x 8 x 2 = 32. bf16 dot products (AVX512-BF16) double the fp32 rate."""
    flags, cores = cpu_flags(), torch.get_num_threads()
    clock_hz = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
        clock_hz = max(mhz) * 1e6
    vendor_amd = "AuthenticAMD" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    if "avx512f" in flags:
        per_cycle = 32 if vendor_amd else 64
    elif "avx2" in flags and "fma" in flags:
        per_cycle = 32
    else:
        per_cycle = 8
    if dtype == "bf16" and "avx512_bf16" in flags:
        per_cycle *= 2
    return {"cores": cores, "clock_ghz": clock_hz / 1e9, "flop_per_cycle_per_core": per_cycle,
            "peak_gflops": cores * clock_hz * per_cycle / 1e9}


def autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()


def peft_model(source: str, num_labels: int):
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels,
                                                               ignore_mismatched_sizes=True)  # a head of its own
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05,
                                            target_modules=["query", "value"], task_type="SEQ_CLS"))


def bare_peft_epochs(model, data, batch_size: int, epochs: int, dtype, same_batches: bool, seed: int) -> float:
    """A plain training loop (AdamW, cross-entropy); returns seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = (batch_indices(data.lengths, batch_size, gen) if same_batches
                 else list(torch.randperm(len(data), generator=gen).split(batch_size)))
        for index in order:
            batch = make_batch(data, index, torch.device("cpu"))
            with autocast(dtype):
                loss = F.cross_entropy(model(**batch).logits.float(), data.labels[index])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def adaptive_instruction(client, m: int, seed: int) -> Instruction:
    """What FedLEASE downloads in the adaptive phase: M experts, the cluster's router, the head."""
    layout = ExpertLayout(num_experts=m, own_expert=1, routing="adaptive")
    adapted = client.adapted
    adapted.configure(layout)
    gen = torch.Generator().manual_seed(seed)
    state = {name: 0.02 * torch.randn(t.shape, generator=gen)
             for name, t in adapted.tensors(["lora_A", "lora_B", "router", "experts", "head"]).items()}
    return Instruction(layout, state, train=ADAPTIVE_PARTS, upload=ADAPTIVE_PARTS)


def training_flops(client, layout_ins: Instruction, method, dtype) -> float:
    """FLOPs of one epoch of the client's local training (forward + backward), counted on its real batches."""
    method.load(client, layout_ins, {})
    params = client.adapted.set_trainable(ADAPTIVE_PARTS)
    data, total = client.train_data, 0.0
    for index in batch_indices(data.lengths, client.settings.batch_size, torch.Generator().manual_seed(0)):
        batch = make_batch(data, index, torch.device("cpu"))
        counter = FlopCounterMode(display=False)
        with counter, autocast(dtype):
            F.cross_entropy(client.logits(batch), data.labels[index]).backward()
        total += counter.get_total_flops()
        for p in params:
            p.grad = None
    return total


def throughput(args) -> dict:
    config = prepare_config(RunConfig(tasks=["rotten_tomatoes:2", "snli:2", "newsgroups:2", "election_tweets:2"],
                                      model_name=args.model_name, train_samples=args.samples, test_samples=32,
                                      batch_size=32,
                                      local_epochs=1, global_rounds=2, warmup_rounds=1, output_dir="unused",
                                      pair_encoding="joint"))
    _, splits = load_partition(config)
    backbone, clients, infos = build_clients(config, splits)
    method = FedLease(config, infos)
    client = clients[2]  # snli: sentence pairs, ~26 tokens
    dtype = client.settings.amp_dtype
    bare = peft_model(backbone.source, backbone.num_labels)
    results = {"ours": [], "peft_same_batches": [], "peft_random_batches": []}
    ins = adaptive_instruction(client, 4, seed=0)
    for rep in range(args.repeats):
        start = time.perf_counter()
        method.client_train(client, ins, rnd=rep, store={})
        results["ours"].append(time.perf_counter() - start)
        results["peft_same_batches"].append(
            bare_peft_epochs(bare, client.train_data, 32, 1, dtype, True, rep))
        results["peft_random_batches"].append(
            bare_peft_epochs(bare, client.train_data, 32, 1, dtype, False, rep))
    n = len(client.train_data)
    rates = {k: n / statistics.median(v) for k, v in results.items()}
    flops = training_flops(client, ins, method, dtype)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    peak = peak_flops(precision)
    achieved = flops / statistics.median(results["ours"])
    return {"task": client.spec.name, "examples": n, "batch_size": 32, "precision": precision,
            "samples_per_s": rates, "throughput_ratio_vs_peft": rates["ours"] / rates["peft_same_batches"],
            "throughput_ratio_vs_peft_random_batches": rates["ours"] / rates["peft_random_batches"],
            "train_gflop_per_epoch": flops / 1e9, "achieved_gflops": achieved / 1e9, "peak": peak,
            "fraction_of_peak": achieved / (peak["peak_gflops"] * 1e9) if peak["peak_gflops"] else None}


def round_split(args) -> list[dict]:
    """Time split of each round of a short FedLEASE run, by wrapping the loop's steps."""
    from fedlease.methods import fedlease as fedlease_module
    from fedlease.runtime import loop, simulation

    timings: list[dict] = []
    current: dict = {}

    def timed(owner, name, key):
        original = getattr(owner, name)

        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                current[key] = current.get(key, 0.0) + time.perf_counter() - start

        setattr(owner, name, wrapper)
        return original

    originals = [
        (simulation.InProcessTransport, "train", timed(simulation.InProcessTransport, "train", "train")),
        (simulation.InProcessTransport, "evaluate", timed(simulation.InProcessTransport, "evaluate", "evaluate")),
        (fedlease_module.FedLease, "allocate", timed(fedlease_module.FedLease, "allocate", "cluster")),
        (fedlease_module.FedLease, "aggregate_train",
         timed(fedlease_module.FedLease, "aggregate_train", "aggregate_incl_cluster")),
        (loop.Federation, "checkpoint", timed(loop.Federation, "checkpoint", "checkpoint")),
        (loop.RunRecorder, "record_round", timed(loop.RunRecorder, "record_round", "artifacts")),
    ]
    round_method = loop.Federation.round

    def round_wrapper(self, rnd, waiting=None):
        current.clear()
        start = time.perf_counter()
        result = round_method(self, rnd, waiting)
        total = time.perf_counter() - start
        split = {k: round(v, 3) for k, v in current.items()}
        split["aggregate"] = round(split.pop("aggregate_incl_cluster", 0.0) - split.get("cluster", 0.0), 3)
        split["total"] = round(total, 3)
        split["other"] = round(total - sum(v for k, v in split.items() if k != "total"), 3)
        timings.append({"round": rnd + 1, **split})
        return result

    loop.Federation.round = round_wrapper
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = RunConfig(tasks=["rotten_tomatoes:2", "snli:2", "newsgroups:2", "election_tweets:2"],
                               model_name=args.model_name, train_samples=args.samples // 2, test_samples=32,
                               batch_size=32, global_rounds=2, warmup_rounds=1, output_dir=str(Path(tmp) / "run"))
            simulation.run(config, progress=False)
    finally:
        loop.Federation.round = round_method
        for owner, name, original in originals:
            setattr(owner, name, original)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (a few minutes on a busy 2-core CPU)")
    parser.add_argument("--model_name", default="auto",
                        help="the encoder (default: the offline MiniLM; the test suite passes a tiny one)")
    args = parser.parse_args()
    args.samples, args.repeats = (64, 2) if args.quick else (512, 5)
    machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    result = {"benchmark": "end_to_end", "quick": args.quick, **throughput(args), "round_split": round_split(args),
              "machine": machine}
    for name, rate in result["samples_per_s"].items():
        print(f"{name}: {rate:.1f} samples/s")
    print(f"ratio vs PEFT (same batches): {result['throughput_ratio_vs_peft']:.3f}; achieved "
          f"{result['achieved_gflops']:.1f} GFLOP/s = {100 * (result['fraction_of_peak'] or math.nan):.1f}% of peak")
    for row in result["round_split"]:
        print(f"round {row['round']}: {row}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
