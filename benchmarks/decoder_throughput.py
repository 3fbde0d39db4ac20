"""Training tokens per second of a FedLEASE decoder client vs a bare PEFT LoRA loop, and peak memory.

The FedLEASE side is the runner's own client path (``FederatedMethod.client_train``: load the downloaded state
into the shared model, train, extract the upload) of one instruction-tuning client in FedLEASE's adaptive phase
(M experts, the cluster's router) and in its warmup (one plain LoRA). The bare side is upstream PEFT LoRA (rank
8 on q_proj/v_proj, dropout 0.05, AdamW) on a fresh copy of the same model, with the usual causal-LM loss (the
model's own ``labels`` loss over full-vocabulary logits, prompt masked), on the same tokenised examples, batches
and precision. Tokens are the non-padding tokens of the batches (prompt and response). Each variant runs in its
own subprocess, several times, interleaved, so that its peak memory (RSS on a CPU, ``max_memory_allocated`` on
CUDA) is its own and a load on the machine affects every variant alike.

``--model_name`` defaults to the offline SmolLM2-135M-Instruct; ``--random_config 1b`` (or ``7b``) instead builds a
randomly initialised LLaMA of that shape (speed figures on a GPU, where pretrained weights cannot travel).

Prints one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

RANDOM_CONFIGS = {  # LLaMA shapes: hidden, intermediate, layers, heads, kv heads
    "tiny": (64, 128, 2, 4, 4),
    "1b": (2048, 5632, 22, 32, 4),
    "7b": (4096, 11008, 32, 32, 32),
}


def examples(n: int, seed: int):
    from fedlease.data.tasks import load_task

    data = load_task("instruct_struct2text").train
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return [data[i] for i in order.tolist()]


def random_model_folder(name: str, folder: str, dtype: torch.dtype) -> str:
    """A randomly initialised LLaMA of the named shape with the offline decoder's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedlease.model.causal_lm import resolve_decoder_source

    source, _ = resolve_decoder_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(source)
    hidden, inter, layers, heads, kv = RANDOM_CONFIGS[name]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.device("meta"):
        LlamaForCausalLM(config)  # fail fast on a bad shape
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(args) -> dict:
    """One variant in this process: returns tokens/s over the timed epochs and the peak memory."""
    from fedlease.config import RunConfig
    from fedlease.generation import encode_instructions, lm_batch, response_targets
    from fedlease.methods.base import Instruction
    from fedlease.methods.fedlease import ADAPTIVE_PARTS, FedLease
    from fedlease.model.experts import ExpertLayout
    from fedlease.runtime.clients import load_shared_backbone, train_settings
    from fedlease.runtime.simulation import prepare_config
    from fedlease.train import batch_indices, to_device

    torch.set_num_threads(args.threads)
    config = prepare_config(RunConfig(model_name=args.model_name, tasks=["instruct_struct2text:2"],
                                      batch_size=args.batch_size, local_epochs=1, max_length=args.max_length,
                                      device=args.device, precision=args.precision, output_dir="unused",
                                      global_rounds=2, warmup_rounds=1))
    data_examples = examples(args.samples, args.seed)
    if args.variant == "peft":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from fedlease.model.causal_lm import resolve_decoder_source
        from fedlease.train import resolve_precision

        source, _ = resolve_decoder_source(config.model_name)
        device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        data = encode_instructions(tokenizer, data_examples, args.max_length)
        amp = resolve_precision(args.precision, device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.05)

        def epoch(seed: int) -> int:
            model.train()
            tokens = 0
            for index in batch_indices(data.lengths, args.batch_size, torch.Generator().manual_seed(seed)):
                batch = lm_batch(data, index, device)
                with torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False):
                    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 labels=to_device(response_targets(data, index), device)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tokens += int(batch["attention_mask"].sum())
            return tokens
    else:
        from fedlease.data.tasks import get_spec
        from fedlease.generation import GenerationClient
        from fedlease.methods.base import ClientInfo

        backbone = load_shared_backbone(config)
        device = backbone.device
        data = encode_instructions(backbone.tokenizer, data_examples, args.max_length)
        client = GenerationClient(0, get_spec("instruct_struct2text"), backbone.adapted, data, data,
                                  train_settings(config, backbone), backbone.tokenizer, 8)
        method = FedLease(config, [ClientInfo(0, "instruct_struct2text", ())])
        if args.variant == "fedlease_adaptive":
            layout = ExpertLayout(num_experts=args.experts, own_expert=0, routing="adaptive")
            backbone.adapted.configure(layout)
            gen = torch.Generator().manual_seed(args.seed)
            state = {name: 0.02 * torch.randn(t.shape, generator=gen)
                     for name, t in backbone.adapted.tensors(["lora_A", "lora_B", "router", "experts"]).items()}
            ins = Instruction(layout, state, train=ADAPTIVE_PARTS, upload=ADAPTIVE_PARTS)
        else:
            ins = Instruction(ExpertLayout(), {}, train=("lora_A", "lora_B"), upload=("lora_A", "lora_B"))
        tokens_per_epoch = sum(int(lm_batch(data, index, device)["attention_mask"].sum())
                               for index in batch_indices(data.lengths, args.batch_size, None))

        def epoch(seed: int) -> int:
            method.client_train(client, ins, rnd=seed, store={})
            return tokens_per_epoch

    epoch(0)  # warm-up: kernel caches, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, tokens = time.perf_counter(), 0
    for rep in range(1, args.epochs + 1):
        tokens += epoch(rep)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"variant": args.variant, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_memory_mb": peak_memory_mb(device), "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name", default="auto")
    parser.add_argument("--random_config", choices=sorted(RANDOM_CONFIGS), default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    if args.random_config:
        import tempfile

        folder = tempfile.mkdtemp(prefix=f"llama-{args.random_config}-")
        dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
        args.model_name = random_model_folder(args.random_config, folder, dtype)
    variants = ("fedlease_adaptive", "fedlease_warmup", "peft")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    passthrough = [f"--{k}={v}" for k, v in vars(args).items()
                   if k not in ("variant", "random_config") and v is not None]
    for _ in range(args.repeats):
        for variant in variants:
            out = subprocess.run([sys.executable, __file__, *passthrough, f"--variant={variant}"], check=True,
                                 capture_output=True, text=True)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {v: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                   "peak_memory_mb": max(r["peak_memory_mb"] for r in rs), "runs": rs} for v, rs in runs.items()}
    peft = summary["peft"]["tokens_per_s"]
    result = {
        "benchmark": "decoder_throughput", "model": args.random_config or args.model_name, "device": args.device,
        "threads": args.threads, "samples": args.samples, "batch_size": args.batch_size, "epochs": args.epochs,
        "experts": args.experts, "max_length": args.max_length, "variants": summary,
        "fedlease_adaptive_vs_peft": summary["fedlease_adaptive"]["tokens_per_s"] / peft,
        "fedlease_warmup_vs_peft": summary["fedlease_warmup"]["tokens_per_s"] / peft,
        "target": "fedlease_adaptive_vs_peft >= 0.9",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
