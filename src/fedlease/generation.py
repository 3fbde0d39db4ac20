"""Instruction tuning of one client on a shared causal LM: next-token loss on the response, greedy generation,
ROUGE.

An example is the prompt (the instruction and input in the tokenizer's chat template, or an Alpaca-style
"### Instruction / ### Response" frame for a model without one) followed by the response and the end-of-sequence
token. Training minimises the cross-entropy of the response tokens only: the prompt is masked, as in the
instruction-tuning setups the paper follows, and the LM head is applied only at the positions that predict a
response token (the vocabulary projection is most of a small model's cost). Evaluation generates greedily from
the prompt (left-padded batches, at most ``--max_new_tokens``) and scores the text against the reference with
ROUGE-1 and ROUGE-L F-measures (Google's ``rouge-score``, with stemming, as FLAN-style evaluations do) and, where
the answers are label words, exact match; it also reports the teacher-forced loss of the reference response.

The fit loop, the optimiser, precision and batching are :class:`fedlease.train.LocalClient`'s: only the loss, the
evaluation and the embedding differ, so every method runs unchanged on either kind of client.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedlease.data.instructions import InstructionExample, prompt_text
from fedlease.data.tasks import TaskSpec
from fedlease.errors import ConfigError
from fedlease.model.experts import AdaptedModel
from fedlease.train import LocalClient, TrainSettings, batch_indices, masked_mean, round_up, to_device

IGNORE = -100
ALPACA = "### Instruction:\n{text}\n\n### Response:\n"


@dataclass
class LMEncoded:
    """One split of one client, tokenised: prompt + response + EOS per row, right-padded."""

    input_ids: torch.Tensor  # (N, L)
    lengths: torch.Tensor  # (N,) tokens in the row
    prompt_lengths: torch.Tensor  # (N,) tokens of the prompt: the response starts here
    references: list[str]
    labels: torch.Tensor  # (N,) the answer's label index (0 for free text)
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def example_lengths(self) -> torch.Tensor:
        return self.lengths

    def subset(self, index: torch.Tensor) -> LMEncoded:
        return LMEncoded(self.input_ids[index], self.lengths[index], self.prompt_lengths[index],
                         [self.references[i] for i in index.tolist()], self.labels[index], self.pad_token_id)


class PromptFormat:
    """Renders a user turn as the model's prompt and cuts examples to ``max_length`` tokens."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.scaffold = len(self.ids(self.render("")))
        if self.scaffold + 2 > max_length:
            raise ConfigError(f"--max_length {max_length}: the prompt template alone takes {self.scaffold} tokens, "
                              f"leaving no room for an instruction and a response; raise --max_length")

    def render(self, text: str) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return ALPACA.format(text=text)

    def ids(self, prompt: str) -> list[int]:
        # a chat template writes its own special tokens; a plain frame gets the tokenizer's (BOS)
        return self.tokenizer(prompt, add_special_tokens=not self.chat)["input_ids"]

    def response_ids(self, ex: InstructionExample) -> list[int]:
        return self.tokenizer(ex.output, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def example(self, ex: InstructionExample, answer_room: int | None = None) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids + EOS), together at most ``max_length``. A response that does not fit keeps
        at least half of the room (all that the prompt leaves), and an instruction that does not fit is cut at
        its end, inside the template's frame. ``answer_room`` (test rows): the prompt is cut by its own length
        alone, to what an answer of ``answer_room`` tokens leaves (``answer_room``: the longest response of the
        client's training rows, at most half of the room, as a training row's), so what the model is asked never
        depends on the reference."""
        response = self.response_ids(ex)
        text = prompt_text(ex)
        prompt = self.ids(self.render(text))
        half = (self.max_length - self.scaffold) // 2
        if answer_room is not None:  # a test row: the prompt is fixed first; the reference keeps the room left
            limit = self.max_length - min(answer_room, half)
            if len(prompt) > limit:
                prompt = self.cut(text, limit)
            return prompt, response[: self.max_length - len(prompt)]
        if len(prompt) + len(response) > self.max_length:
            response = response[: max(half, self.max_length - len(prompt))]
            if len(prompt) + len(response) > self.max_length:
                prompt = self.cut(text, self.max_length - len(response))
        return prompt, response

    def cut(self, text: str, limit: int) -> list[int]:
        """The prompt of ``text`` cut at its end until the rendered prompt has at most ``limit`` tokens."""
        text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = max(limit - self.scaffold, 1)
        while True:
            prompt = self.ids(self.render(self.tokenizer.decode(text_ids[:keep])))
            if len(prompt) <= limit or keep == 1:
                return prompt[:limit]  # the slice only ever acts on a one-token text that re-tokenised longer
            keep = max(keep - (len(prompt) - limit), 1)  # a re-tokenised cut may be a token or two long


def encode_instructions(tokenizer, examples: list[InstructionExample], max_length: int,
                        answers_like: list[InstructionExample] | None = None) -> LMEncoded:
    """Token ids of prompt + response per example. ``answers_like`` (for test rows: the client's training
    rows): test prompts get the room their longest response leaves, see ``PromptFormat.example``."""
    fmt = PromptFormat(tokenizer, max_length)
    room = None if answers_like is None else max((len(fmt.response_ids(ex)) for ex in answers_like), default=0)
    rows = [fmt.example(ex, room) for ex in examples]
    lengths = torch.tensor([len(p) + len(r) for p, r in rows], dtype=torch.long)
    width = min(round_up(int(lengths.max())), max_length) if rows else 0
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        ids[i, : len(prompt) + len(response)] = torch.tensor(prompt + response, dtype=torch.long)
    return LMEncoded(ids, lengths, torch.tensor([len(p) for p, _ in rows], dtype=torch.long),
                     [ex.output for ex in examples], torch.tensor([ex.label for ex in examples], dtype=torch.long),
                     tokenizer.pad_token_id)


def lm_width(data: LMEncoded, index: torch.Tensor) -> int:
    """The width of rows ``index``: their longest rounded up to a multiple of 8, at most the encoded width."""
    return min(round_up(int(data.lengths[index].max())), data.input_ids.shape[1])


def response_targets(data: LMEncoded, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` at ``lm_width``, on the host: each response token's id (its end-of-sequence token included),
    ``IGNORE`` at the prompt's and the padding's positions (Hugging Face's ``labels``)."""
    width = lm_width(data, index)
    positions = torch.arange(width)
    response = (positions < data.lengths[index, None]) & (positions >= data.prompt_lengths[index, None])
    return torch.where(response, data.input_ids[index, :width], IGNORE)


def lm_batch(data: LMEncoded, index: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor | int]:
    """Rows ``index`` trimmed to their longest (rounded up to 8); and, found on the host so that the loss needs no
    wait for the device, the positions (row x width + position) whose next token is a response token (the
    targets: the response and its end-of-sequence token), those targets and their number."""
    width = lm_width(data, index)
    ids = data.input_ids[index, :width]
    attention = torch.arange(width) < data.lengths[index, None]
    targets = response_targets(data, index)
    following = torch.full_like(targets, IGNORE)  # what position p of each row predicts: its token at p + 1
    following[:, :-1] = targets[:, 1:]
    following = following.flatten()
    scored = (following != IGNORE).nonzero().squeeze(1)
    return {"input_ids": to_device(ids, device), "attention_mask": to_device(attention.long(), device),
            "scored_positions": to_device(scored, device),
            "scored_targets": to_device(following[scored], device), "scored_tokens": len(scored)}


def left_padded_prompts(data: LMEncoded, index: torch.Tensor, device: torch.device, width: int = 0
                        ) -> dict[str, torch.Tensor]:
    """The prompts of rows ``index``, left-padded to their longest, or to ``width`` where that is longer."""
    prompts = [data.input_ids[i, : data.prompt_lengths[i]] for i in index.tolist()]
    width = max(width, *(len(p) for p in prompts))
    ids = torch.full((len(prompts), width), data.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return {"input_ids": to_device(ids, device), "attention_mask": to_device(mask, device)}


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces (SQuAD's normalisation, without dropping articles)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


class UnicodeRougeTokenizer:
    """rouge-score's default tokenisation (lower case, runs of letters and digits, Porter stemming of words over
    three characters) for any script: the default keeps only ``[a-z0-9]``, so a reference in Cyrillic, Greek or
    CJK has no tokens and every answer scores 0, and accented words fall apart. Identical on ASCII text."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self.stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        return [self.stemmer.stem(t) if len(t) > 3 else t for t in re.findall(r"[^\W_]+", text.lower())]


def generation_metrics(spec: TaskSpec, predictions: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F (rouge-score, stemmed; blind to case and punctuation), exact match of label answers
    (normalised), and for edits of case and punctuation the cased exact match, which sees them."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], tokenizer=UnicodeRougeTokenizer())
    scores = [scorer.score(ref, pred) for ref, pred in zip(references, predictions, strict=True)]
    metrics = {name: float(np.mean([s[name].fmeasure for s in scores])) if scores else 0.0
               for name in ("rouge1", "rougeL")}
    pairs = list(zip(predictions, references, strict=True))
    if spec.labels:
        metrics["exact_match"] = float(np.mean([normalize_answer(p) == normalize_answer(r) for p, r in pairs]))
    if spec.extra_metric == "exact_match_cased":
        metrics["exact_match_cased"] = float(np.mean([p.split() == r.split() for p, r in pairs]))
    return metrics


class GenerationClient(LocalClient):
    """One client's instruction data bound to the process's shared causal LM."""

    def __init__(self, client_id: int, spec: TaskSpec, adapted: AdaptedModel, train: LMEncoded, test: LMEncoded,
                 settings: TrainSettings, tokenizer, max_new_tokens: int, cache: str = "dynamic") -> None:
        super().__init__(client_id, spec, adapted, train, test, settings)  # type: ignore[arg-type]
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.cache = cache  # --generation_cache: static lets transformers compile the decoding step on CUDA

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's last hidden states, without the LM head."""
        return self.adapted.model.get_decoder()(input_ids=batch["input_ids"],
                                                attention_mask=batch["attention_mask"]).last_hidden_state

    def scored_losses(self, batch: dict[str, torch.Tensor | int]) -> torch.Tensor:
        """The cross-entropy of each scored position of ``lm_batch``'s ``batch`` (its response tokens)."""
        hidden = self.hidden_states(batch).flatten(0, 1).index_select(0, batch["scored_positions"])
        logits = self.adapted.model.get_output_embeddings()(hidden).float()  # the LM head on scored positions only
        return F.cross_entropy(logits, batch["scored_targets"], reduction="none")

    def token_losses(self, data: LMEncoded, index: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy of the response tokens of rows ``index``, and their number."""
        batch = lm_batch(data, index, self.settings.device)
        return self.scored_losses(batch).sum(), batch["scored_tokens"]

    def example_losses(self, data: LMEncoded, index: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Each row's mean cross-entropy over its own response tokens, (len(index),): what DP-SGD clips."""
        batch = lm_batch(data, index, self.settings.device)
        rows = batch["scored_positions"] // batch["input_ids"].shape[1]
        totals = torch.zeros(len(index), device=rows.device).index_add_(0, rows, self.scored_losses(batch))
        return totals / torch.bincount(rows, minlength=len(index)).clamp(min=1)

    def batch_loss(self, data: LMEncoded, index: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total, count = self.token_losses(data, index)
        return total / max(count, 1)

    def batch_tokens(self, data: LMEncoded, index: torch.Tensor) -> int:  # type: ignore[override]
        return len(index) * lm_width(data, index)

    def loss_weight(self, data: LMEncoded, index: torch.Tensor) -> int:  # type: ignore[override]
        """``batch_loss`` is a mean over the rows' response tokens (EOS included): their number."""
        return int((data.lengths[index] - data.prompt_lengths[index]).sum())

    @torch.inference_mode()
    def mean_loss(self, data: LMEncoded, mixture: torch.Tensor | None = None) -> float:
        """Mean cross-entropy per response token; ``mixture`` (N, M): per-example expert weights."""
        self.adapted.model.eval()
        total, count = torch.zeros((), device=self.settings.device), 0  # read once, at the end
        for index in batch_indices(data.example_lengths, self.settings.eval_batch_size, None):
            if mixture is not None:
                self.adapted.set_mixture(mixture[index])
            with self.settings.autocast():
                loss, n = self.token_losses(data, index)
            total, count = total + loss, count + n
        return float(total) / max(count, 1)

    @torch.inference_mode()
    def generate(self, data: LMEncoded, mixture: torch.Tensor | None = None) -> list[str]:
        """Greedy completions of every prompt of ``data``, in data order."""
        settings, model = self.settings, self.adapted.model
        model.eval()
        out = [""] * len(data)
        # a static cache compiles once per shape: every batch at one width (the longest prompt, rounded up)
        width = round_up(int(data.prompt_lengths.max())) if self.cache == "static" and len(data) else 0
        for index in batch_indices(data.prompt_lengths, settings.eval_batch_size, None):
            batch = left_padded_prompts(data, index, settings.device, width)
            if mixture is not None:
                self.adapted.set_mixture(mixture[index])
            with settings.autocast():
                tokens = model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                        pad_token_id=data.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                                        **({"cache_implementation": "static"} if self.cache == "static" else {}))
            texts = self.tokenizer.batch_decode(tokens[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(index.tolist(), texts, strict=True):
                out[i] = text.strip()
        return out

    def evaluate(self, mixture: torch.Tensor | None = None) -> dict[str, float]:
        data = self.test_data
        metrics = generation_metrics(self.spec, self.generate(data, mixture), data.references)
        metrics["loss"] = self.mean_loss(data, mixture)
        return metrics

    def batch_embedding(self, data: LMEncoded, index: torch.Tensor,  # type: ignore[override]
                        inputs_only: bool = False) -> torch.Tensor:
        """Each example's mean last hidden state over its prompt and response tokens, or (``inputs_only``) over
        its prompt tokens alone (causal attention: they never see the response)."""
        batch = lm_batch(data, index, self.settings.device)
        mask = batch["attention_mask"]
        if inputs_only:
            positions = torch.arange(mask.shape[1], device=mask.device)
            mask = mask * (positions < to_device(data.prompt_lengths[index, None], mask.device))
        return masked_mean(self.hidden_states(batch), mask)

    def train_loss(self) -> float:
        return self.mean_loss(self.train_data)
