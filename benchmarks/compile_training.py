"""What torch.compile would buy FedLEASE's local training (issue 32): the same clients trained eager, then compiled.

The expert layers' host work is what keeps a GPU idle (benchmarks/results/gpu: 13-22 thousand aten calls per
encoder step, the GPU busy 32-46%). Compiling the model's forward (and with it, through AOTAutograd, its backward)
replaces those calls with a few generated kernels, at the price of compiling: once per graph, and again whenever a
guard fails. This measures both on the package's own client code, so that a GPU session can decide whether a
``--compile`` option is worth having:

1. an encoder of one of ``gpu.py``'s shapes (random weights, word-level tokenizer, loaded by the package's loader)
   and one GLUE-shaped synthetic client per task (sst2, qnli, mrpc, qqp);
2. eager: two warmup rounds (plain LoRA), then two adaptive rounds (K experts, each client's own expert
   ``client % K``), every client's ``fit`` timed, each fit of a layout from the same seeded state; then the
   profiler's aten calls per step of one adaptive fit;
3. the same model compiled in place (``nn.Module.compile``, ``--backend``, ``--mode``) and the same sequence again:
   the first round of each layout pays the compilation (reported as its extra time over the second round), the
   second is steady (reported against eager's second round), with the graphs dynamo made and the losses of both
   (equal with the ``eager`` and ``aot_eager`` backends; inductor draws dropout from its own generator).

Prints one JSON object as the last line of stdout (``--out`` also writes it). ``--quick`` is the test suite's run
(tiny shapes, torch.compile's ``eager`` backend: dynamo's graphs and guards, run without generating code; the
expert layer's backward through AOTAutograd, as inductor gets it, is tested on the layer alone, in
tests/test_experts.py).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

GPU = Path(__file__).with_name("gpu.py")


def gpu_module():
    """benchmarks/gpu.py, for its model shapes, random-model folders and synthetic GLUE clients."""
    spec = importlib.util.spec_from_file_location("fedlease_gpu_benchmark", GPU)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clients_of(args, gpu, scratch: Path):
    from fedlease.config import RunConfig
    from fedlease.data.partition import ClientSplit
    from fedlease.model.backbone import resolve_device
    from fedlease.runtime import simulation
    from fedlease.runtime.clients import load_shared_backbone, local_client, train_settings

    device = resolve_device(args.device)
    gpu.build_folder("encoder", args.shape, scratch / "encoder", device, torch.float32)
    tasks = list(gpu.GLUE_TASKS)
    config = simulation.prepare_config(RunConfig(
        model_name=str(scratch / "encoder"), tasks=tasks, train_samples=args.train, test_samples=8,
        batch_size=args.batch, local_epochs=1, device=device.type, output_dir=str(scratch / "run"),
        pair_encoding="joint", precision=args.precision))
    backbone = load_shared_backbone(config)
    settings = train_settings(config, backbone)
    vocab = gpu.SHAPES[args.shape]["vocab_size"]
    splits = [ClientSplit(cid, task, gpu.glue_examples(task, args.train, vocab, 10 + cid),
                          gpu.glue_examples(task, 8, vocab, 1000 + cid), 0) for cid, task in enumerate(tasks)]
    return backbone, settings, [local_client(config, backbone, settings, split) for split in splits]


def adaptive_layout(client, experts: int):
    """The adaptive layout of ``client``: K = ``experts``, its own expert ``client % K``."""
    from fedlease.model.experts import ExpertLayout

    return ExpertLayout(experts, client.client_id % experts, "adaptive")


def rounds(clients, experts: int, sync: Callable[[], None]) -> list[dict]:
    """Two warmup rounds, then two adaptive rounds: every client's fit timed (seconds), its loss and steps."""
    from fedlease.methods.fedlease import ADAPTIVE_PARTS, WARMUP_PARTS
    from fedlease.model.experts import ExpertLayout

    out = []
    for name, parts in (("warmup", WARMUP_PARTS), ("adaptive", ADAPTIVE_PARTS)):
        for repeat in range(2):
            fits = []
            for client in clients:
                layout = ExpertLayout() if name == "warmup" else adaptive_layout(client, experts)
                client.apply(layout, start_state(client, layout))
                sync()
                start = time.perf_counter()
                metrics = client.fit(parts, seed=1)
                sync()
                fits.append({"seconds": time.perf_counter() - start, "steps": metrics["steps"],
                             "loss": metrics["train_loss"]})
            out.append({"layout": name, "round": repeat + 1, "fits": fits})
    return out


def start_state(client, layout) -> dict[str, torch.Tensor]:
    """Every array of ``layout`` (LoRA, banks, router, head) drawn from a seed of its own: each fit of a layout starts
    from the same state, eager or compiled, so that their losses compare."""
    from fedlease.model.experts import PARTS

    client.adapted.configure(layout)
    return {name: 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(index))
            for index, (name, t) in enumerate(sorted(client.adapted.tensors(PARTS).items()))}


def aten_calls_per_step(client, experts: int) -> tuple[float, float]:
    """aten calls per step of one adaptive fit under the profiler, and how many of them make the batches (cut the
    rows, trim, mask, the labels, the copies to the device: ``make_batch`` and ``to_device``)."""
    from torch.profiler import profile, record_function

    from fedlease import train
    from fedlease.methods.fedlease import ADAPTIVE_PARTS

    def marked(fn):
        def call(*args, **kwargs):
            with record_function("batch making"):
                return fn(*args, **kwargs)
        return call

    layout = adaptive_layout(client, experts)
    client.apply(layout, start_state(client, layout))
    originals = train.make_batch, train.to_device
    train.make_batch, train.to_device = map(marked, originals)
    try:
        with profile() as prof:
            metrics = client.fit(ADAPTIVE_PARTS, seed=1)
    finally:
        train.make_batch, train.to_device = originals
    steps = max(metrics["steps"], 1)
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    return len(aten) / steps, sum(1 for e in aten if within(e, "batch making")) / steps


def within(event, name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None and parent.name != name:
        parent = parent.cpu_parent
    return parent is not None


def summary(rows: list[dict]) -> dict:
    """Per layout: the first round's seconds (compiling, if any) and the second's, per step."""
    out = {}
    for row in rows:
        steps = sum(f["steps"] for f in row["fits"])
        seconds = sum(f["seconds"] for f in row["fits"])
        key = f"{row['layout']}_round{row['round']}"
        out[key] = {"seconds": seconds, "seconds_per_step": seconds / max(steps, 1),
                    "mean_loss": statistics.fmean(f["loss"] for f in row["fits"])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and the eager backend (the test suite)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--shape", default="roberta-tiny", help="an encoder shape of gpu.py (e.g. roberta-large)")
    parser.add_argument("--train", type=int, default=64, help="training examples per client")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--experts", type=int, default=4, help="K of the adaptive rounds (own expert: client % K)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend")
    parser.add_argument("--mode", default=None, help="torch.compile's mode (e.g. reduce-overhead: CUDA graphs)")
    parser.add_argument("--eager_only", action="store_true",
                        help="the eager half alone: the package's own time per training step, no compiling")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.shape, args.train, args.batch, args.backend = "roberta-tiny", 16, 8, "eager"
    import torch._dynamo
    from torch._dynamo.utils import counters

    gpu = gpu_module()
    with tempfile.TemporaryDirectory() as scratch:
        backbone, settings, clients = clients_of(args, gpu, Path(scratch))
        device = settings.device
        sync = functools.partial(gpu.sync, device)  # a CUDA fit is timed once its kernels have run
        result = {"benchmark": "compile_training", "quick": args.quick, "shape": args.shape, "device": str(device),
                  "precision": str(settings.amp_dtype or "fp32").removeprefix("torch."), "clients": len(clients),
                  "train_per_client": args.train, "batch_size": args.batch, "experts": args.experts,
                  "backend": args.backend, "mode": args.mode, "machine": {
                      "platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}}
        eager = rounds(clients, args.experts, sync)
        calls, batch_calls = aten_calls_per_step(clients[0], args.experts)
        result["eager"] = {**summary(eager), "aten_calls_per_adaptive_step": calls,
                           "batch_making_aten_calls_per_adaptive_step": batch_calls}
        result["rounds"] = {"eager": eager}
        write(result, args.out)  # a short lease that ends while compiling keeps the eager half
        if args.eager_only:
            print(json.dumps(result))
            return
        torch._dynamo.reset()
        counters.clear()
        backbone.adapted.model.compile(backend=args.backend, mode=args.mode)
        compiled = rounds(clients, args.experts, sync)
        result["compiled"] = {**summary(compiled), "aten_calls_per_adaptive_step": aten_calls_per_step(
            clients[0], args.experts)[0], "graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": sum(counters["graph_break"].values())}
        result["rounds"]["compiled"] = compiled
        if device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    for layout in ("warmup", "adaptive"):
        steady = result["compiled"][f"{layout}_round2"]["seconds_per_step"]
        result[f"{layout}_steady_step_compiled_over_eager"] = steady / result["eager"][f"{layout}_round2"][
            "seconds_per_step"]
        # the compiled first round's extra time over its second (the eager half ran first: its cold caches are
        # warm by now, so eager's own first-round extra is not subtracted)
        result[f"{layout}_compile_seconds"] = (result["compiled"][f"{layout}_round1"]["seconds"]
                                               - result["compiled"][f"{layout}_round2"]["seconds"])
        print(f"{layout}: steady step compiled / eager {result[f'{layout}_steady_step_compiled_over_eager']:.3f}, "
              f"compiling {result[f'{layout}_compile_seconds']:.1f} s")
    print(f"graphs: {result['compiled']['graphs']}, graph breaks: {result['compiled']['graph_breaks']}; aten calls "
          f"per adaptive step {result['eager']['aten_calls_per_adaptive_step']:.0f} eager, "
          f"{result['compiled']['aten_calls_per_adaptive_step']:.0f} compiled; making the batches "
          f"{result['eager']['batch_making_aten_calls_per_adaptive_step']:.1f} of them in eager")
    write(result, args.out)
    print(json.dumps(result))


def write(result: dict, out: str | None) -> None:
    if out:
        Path(out).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
