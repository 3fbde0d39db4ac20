"""Forward+backward time of one adapted attention projection: our expert layer vs the released algorithm vs LoRA.

Shape: MiniLM-L6 size (384 -> 384), batch 32, 64 tokens, rank 4, per M in {1, 2, 4, 8}:
- ours: ``fedlease.model.experts.ExpertLinear`` with adaptive routing (2M-1 slots, top-M);
- reference: the released code's algorithm, written here for comparison: a loop over the top-M slots and,
  inside it, over the experts, each expert recomputed for every slot that may select it, with a boolean mask
  per (slot, expert) and a host sync (``mask.any()``) per mask;
- LoRA: one plain PEFT LoRA layer (``peft.tuners.lora.Linear``) of the same rank.
The input requires grad (as inside a network), LoRA weights and routers are trained, the base weight frozen.

Beside the times, the operations one forward+backward issues, counted under ``torch.profiler`` (the same on any
machine and load, so comparable across commits): every aten call the dispatcher sees (views and nested calls
included: the host's work) and the compute operations among them (those that write memory: products,
element-wise, reductions, copies, fills, concatenations, top-k: roughly what a GPU launches as kernels).

Prints one JSON object as the last line of stdout; ``--quick`` runs fewer repetitions (well under a minute).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fedlease.model.experts import ExpertLayout, ExpertLinear

D, BATCH, TOKENS, RANK, ALPHA, DROPOUT = 384, 32, 64, 4, 16.0, 0.05


class ReleasedAlgorithm(nn.Module):
    """The released code's expert forward, re-stated: per top-slot, per expert, masked, recomputed."""

    def __init__(self, base: nn.Linear, m: int, own: int) -> None:
        super().__init__()
        self.base, self.m, self.own, self.scaling = base, m, own, ALPHA / RANK
        self.A = nn.ModuleList(nn.Linear(D, RANK, bias=False) for _ in range(m))
        self.B = nn.ModuleList(nn.Linear(RANK, D, bias=False) for _ in range(m))
        self.router = nn.Linear(D, 2 * m - 1, bias=False)
        self.dropout = nn.Dropout(DROPOUT)
        mapping = torch.arange(2 * m - 1)
        mapping[m:] = own
        self.register_buffer("mapping", mapping)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        weights = F.softmax(self.router(x), dim=-1, dtype=torch.float32).to(result.dtype)
        dropped = self.dropout(x)
        top_w, top_i = torch.topk(weights, self.m, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        for slot in range(self.m):
            experts = self.mapping[top_i[..., slot]]
            slot_w = top_w[..., slot].unsqueeze(-1)
            for i in range(self.m):
                mask = experts == i
                if not mask.any():  # a host sync per (slot, expert)
                    continue
                out = self.B[i](self.A[i](dropped))  # recomputed for every slot
                masked = torch.zeros_like(slot_w)
                masked[mask] = slot_w[mask]
                result = result + masked * out * self.scaling
        return result


def ours(base: nn.Linear, m: int) -> nn.Module:
    layer = ExpertLinear(base, RANK, ALPHA, DROPOUT)
    layout = ExpertLayout() if m == 1 else ExpertLayout(num_experts=m, own_expert=m // 2, routing="adaptive")
    layer.configure(layout)
    with torch.no_grad():
        for tensor in (layer.lora_A, layer.lora_B, layer.experts_A, layer.experts_B):
            tensor.normal_(0, 0.02)
        if layer.router is not None:
            nn.init.kaiming_uniform_(layer.router, a=math.sqrt(5))
            layer.router.requires_grad_(True)
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)
    return layer


def peft_lora(base: nn.Linear) -> nn.Module:
    """PEFT's own LoRA layer around ``base`` (built through get_peft_model, its public entry point)."""
    import copy

    from peft import LoraConfig, get_peft_model

    holder = nn.Module()
    holder.query = copy.deepcopy(base)
    model = get_peft_model(holder, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                              target_modules=["query"]))
    layer = model.base_model.model.query
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)
    return layer


def time_fwd_bwd(module: nn.Module, repeats: int, warmup: int) -> float:
    """Median seconds of one forward+backward."""
    x = torch.randn(BATCH, TOKENS, D, requires_grad=True)
    grad = torch.randn(BATCH, TOKENS, D)
    module.train()
    samples = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        module(x).backward(grad)
        samples.append(time.perf_counter() - start)
        for p in module.parameters():
            p.grad = None
        x.grad = None
        if i < warmup:
            samples.pop()
    return statistics.median(samples)


# aten operators that compute (write memory); views, allocations, dtype no-ops and dispatch wrappers are left out
COMPUTE_OPS = frozenset(f"aten::{name}" for name in (
    "mm", "addmm", "bmm", "mul", "mul_", "add", "add_", "sub", "div", "div_", "neg", "copy_", "cat", "_softmax",
    "_softmax_backward_data", "topk", "ge", "fill_", "zero_", "bernoulli_", "index_copy_", "index_select",
    "scatter_add_", "scatter_", "gather", "sum", "index", "repeat_interleave", "masked_fill_", "where",
    "value_selecting_reduction_backward"))


def count_ops(module: nn.Module) -> dict[str, int]:
    """aten calls and compute operations of one forward+backward (after a warm-up call), by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(2, 8, D, requires_grad=True)
    module.train()
    module(x).sum().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        module(x).sum().backward()
    names = [event.name for event in prof.events() if event.name.startswith("aten::")]
    return {"aten_calls": len(names), "compute_ops": sum(name in COMPUTE_OPS for name in names)}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (under a minute)")
    args = parser.parse_args()
    repeats, warmup = (8, 2) if args.quick else (60, 10)
    torch.manual_seed(0)
    base = nn.Linear(D, D)
    base.requires_grad_(False)
    results = {}
    lora_layer = peft_lora(base)
    lora, lora_ops = time_fwd_bwd(lora_layer, repeats, warmup), count_ops(lora_layer)
    for m in (1, 2, 4, 8):
        layer = ours(base, m)
        ours_s = time_fwd_bwd(layer, repeats, warmup)
        ref_s = time_fwd_bwd(ReleasedAlgorithm(base, m, own=m // 2), repeats, warmup) if m > 1 else None
        results[f"m{m}"] = {"ours_ms": 1e3 * ours_s, "reference_ms": None if ref_s is None else 1e3 * ref_s,
                            "lora_ms": 1e3 * lora, "ours_ops": count_ops(layer), "lora_ops": lora_ops}
        print(f"M={m}: ours {1e3 * ours_s:.3f} ms, reference "
              f"{'-' if ref_s is None else f'{1e3 * ref_s:.3f} ms'}, LoRA {1e3 * lora:.3f} ms")
    m4 = results["m4"]
    summary = {"benchmark": "expert_layer", "shape": {"d": D, "batch": BATCH, "tokens": TOKENS, "rank": RANK},
               "repeats": repeats, "results": results,
               "speedup_vs_reference_m4": m4["reference_ms"] / m4["ours_ms"],
               "overhead_vs_lora_m4": m4["ours_ms"] / m4["lora_ms"],
               "overhead_vs_lora_m1": results["m1"]["ours_ms"] / results["m1"]["lora_ms"],
               "machine": machine()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
