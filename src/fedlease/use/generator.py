"""A trained client of an instruction run, ready to answer prompts (``fedlease generate``).

Prompts are rendered in the template the run trained with (``fedlease.generation.PromptFormat``: the tokenizer's
chat template, else the Alpaca frame) and answered greedily, as the run's evaluation answered its test rows; on the
client's own test split the responses, ROUGE and loss are the ones the run recorded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlease.data.instructions import InstructionExample
from fedlease.generation import GenerationClient, LMEncoded, encode_instructions, generation_metrics
from fedlease.model.backbone import Backbone
from fedlease.use.client import TrainedClient
from fedlease.use.final import FinalClient


class GeneratorModel(TrainedClient):
    def __init__(self, final: FinalClient, device: str = "auto", batch_size: int | None = None,
                 progress: bool = False, own: list[InstructionExample] | None = None,
                 max_new_tokens: int | None = None) -> None:
        self.max_new_tokens = max_new_tokens or final.config.max_new_tokens
        super().__init__(final, device, batch_size, progress, own)

    def load_backbone(self) -> Backbone:
        from fedlease.model.causal_lm import load_causal_lm

        config = self.config
        return load_causal_lm(config.model_name, rank=config.rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                              target_modules=self.final.target_modules, device=config.device,
                              quantization=config.quantization, attention_dropout=not config.no_attention_dropout,
                              precision=config.precision)

    def make_client(self, train: LMEncoded | None) -> GenerationClient:
        from fedlease.runtime.clients import train_settings

        return GenerationClient(self.final.client, self.spec, self.backbone.adapted,
                                self.encode([]) if train is None else train, self.encode([]),
                                train_settings(self.config, self.backbone), self.backbone.tokenizer,
                                self.max_new_tokens, self.config.generation_cache)

    def encode(self, examples: Sequence[InstructionExample],
               answers_like: Sequence[InstructionExample] | None = None) -> LMEncoded:
        return encode_instructions(self.backbone.tokenizer, list(examples), self.config.max_length,
                                   None if answers_like is None else list(answers_like))

    def responses(self, data: LMEncoded) -> list[str]:
        return self.client.generate(data, self.applied(data))

    def generate(self, instructions: Sequence[str], inputs: Sequence[str] | None = None) -> list[str]:
        """One greedy response per instruction (with its input, where given)."""
        inputs = inputs if inputs is not None else [""] * len(instructions)
        rows = [InstructionExample(i, x, "", 0) for i, x in zip(instructions, inputs, strict=True)]
        out: list[str] = []
        for chunk in self.chunks(rows, "generate"):
            out += self.responses(self.encode(chunk))
        return out

    @torch.inference_mode()
    def evaluate(self, split: str = "test") -> tuple[dict[str, float], list[dict]]:
        """The client's metrics on its own ``split`` (for "test", the ones the run recorded: the prompts get the
        room the client's training responses leave, as in the run), and one response per row with its
        ``reference``."""
        rows = self.examples(split)
        data = self.encode(rows, answers_like=self.examples("train") if split == "test" else None)
        mixture = self.applied(data)
        responses = self.client.generate(data, mixture)
        metrics = generation_metrics(self.spec, responses, data.references)
        metrics["loss"] = self.client.mean_loss(data, mixture)
        return metrics, [{"response": r, "reference": ref} for r, ref in zip(responses, data.references, strict=True)]
