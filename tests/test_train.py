"""Batching (padding to a multiple of 8), the attention-dropout switch and the head of the shared backbone."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import string

import pytest
import torch
from safetensors.torch import load_file
from torch.profiler import profile

from fedlease.config import ConfigError
from fedlease.data.tasks import Example
from fedlease.model.backbone import load_backbone
from fedlease.train import (
    PAD_MULTIPLE,
    batch_indices,
    encode,
    make_batch,
    resolve_precision,
    to_device,
    token_chunks,
)


def test_batches_are_padded_to_a_multiple_of_eight_without_changing_predictions(tiny_model, tiny_clients):
    from transformers import AutoTokenizer

    _, clients, _ = tiny_clients
    cpu = torch.device("cpu")
    # the clients' splits, which the character-level tokenizer mostly cuts at --max_length 24, and sentence pairs
    # of many lengths that nothing cuts
    words = "a cat sat on the mat and then ran off".split()
    pairs = [Example(" ".join(words[: 1 + i % 10]), " ".join(words[i % 4:]), i % 3) for i in range(24)]
    data_pairs = encode(AutoTokenizer.from_pretrained(tiny_model), pairs, max_length=96)
    assert data_pairs.token_type_ids is not None and int(data_pairs.lengths.max()) < 96
    splits = [(data, order) for client in clients
              for data, order in ((client.train_data, torch.Generator().manual_seed(0)), (client.test_data, None))]
    widths = set()
    for data, order in [*splits, (data_pairs, torch.Generator().manual_seed(0)), (data_pairs, None)]:
        assert data.input_ids.shape[1] % PAD_MULTIPLE == 0
        for index in batch_indices(data.lengths, 4, order):
            batch = make_batch(data, index, cpu)
            width, longest = batch["input_ids"].shape[1], int(data.lengths[index].max())
            widths.add(width)
            assert width % PAD_MULTIPLE == 0 and longest <= width < longest + PAD_MULTIPLE
            assert torch.equal(batch["attention_mask"].sum(1), data.lengths[index])
    assert len(widths) > 1  # the lengths vary, so this checked more than one shape

    client = clients[2]
    index = torch.arange(len(data_pairs))
    padded = make_batch(data_pairs, index, cpu)
    longest = int(data_pairs.lengths.max())
    trimmed = {key: value[:, :longest] for key, value in padded.items()}
    assert padded["input_ids"].shape[1] > longest  # the padding is there to be ignored
    client.adapted.model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(client.logits(padded), client.logits(trimmed), rtol=1e-4, atol=1e-5)


def test_padding_never_exceeds_max_length(tiny_model):
    """A --max_length that is not a multiple of 8 (e.g. a model's position limit) is never padded past."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = [Example("word " * n, None, 0) for n in (3, 30, 30, 5)]
    data = encode(tokenizer, examples, max_length=13)
    assert data.input_ids.shape[1] == 13 and int(data.lengths.max()) == 13
    for index in (torch.tensor([0, 3]), torch.tensor([1, 2, 0])):
        batch = make_batch(data, index, torch.device("cpu"))
        width = batch["input_ids"].shape[1]
        assert width == min(-(-int(data.lengths[index].max()) // PAD_MULTIPLE) * PAD_MULTIPLE, 13)
        assert batch["attention_mask"].shape == batch["input_ids"].shape


def attention_kernels(adapted) -> set[str]:
    """The attention kernels one training step of the adapted model runs."""
    adapted.set_trainable(["lora_A", "lora_B"])
    model = adapted.model
    model.train()
    ids = torch.randint(5, 40, (4, 16))
    mask = torch.ones_like(ids)
    mask[:2, 12:] = 0
    with profile() as prof:
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    return {e.key for e in prof.key_averages() if "dot_product" in e.key and "backward" not in e.key}


def test_no_attention_dropout_switches_only_attention_dropout_off(tiny_model):
    default = load_backbone(tiny_model, 2, rank=4, alpha=16, dropout=0.05, device="cpu").adapted
    off = load_backbone(tiny_model, 2, rank=4, alpha=16, dropout=0.05, device="cpu", attention_dropout=False).adapted
    assert default.model.config.attention_probs_dropout_prob > 0 and off.model.config.attention_probs_dropout_prob == 0
    assert off.model.config.hidden_dropout_prob == default.model.config.hidden_dropout_prob > 0
    # With attention dropout PyTorch falls back to the unfused attention; without it the fused kernel runs.
    assert "aten::_scaled_dot_product_attention_math" in attention_kernels(default)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in attention_kernels(off)


def load_logged(caplog, monkeypatch, folder: str, num_labels: int, **kwargs):
    """The adapted model of ``load_backbone`` and what it logged."""
    monkeypatch.setattr(logging.getLogger("fedlease"), "propagate", True)  # the CLI turns it off
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedlease"):
        adapted = load_backbone(folder, num_labels, rank=4, alpha=16, dropout=0.0, device="cpu", **kwargs).adapted
    return adapted, caplog.text


def test_a_checkpoint_head_of_the_right_width_is_every_clients_start(tiny_model, caplog, monkeypatch):
    saved = load_file(f"{tiny_model}/model.safetensors")  # the tiny model was saved with a 2-wide head
    adapted, text = load_logged(caplog, monkeypatch, tiny_model, 2)
    assert "starts from the checkpoint's head" in text
    state = adapted.initial_state(7)
    for name in ("classifier.weight", "classifier.bias"):
        torch.testing.assert_close(state[f"head.{name}"], saved[name])
    adapted.load_state({key: torch.zeros_like(value) for key, value in state.items() if key.startswith("head.")})
    torch.testing.assert_close(adapted.initial_state(7)["head.classifier.weight"], saved["classifier.weight"])
    # a head of another width is new: a seeded draw
    adapted, text = load_logged(caplog, monkeypatch, tiny_model, 3)
    assert "starts from a new seeded head" in text
    weight = adapted.initial_state(7)["head.classifier.weight"]
    assert weight.shape == (3, 32) and torch.equal(weight, adapted.initial_state(7)["head.classifier.weight"])


def test_a_new_layernorm_in_the_head_starts_at_one(tmp_path):
    """ModernBERT's classification head has a LayerNorm; from a bare encoder checkpoint it is new."""
    from transformers import BertTokenizerFast, ModernBertConfig, ModernBertModel

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)  # vocab_file: ignored by transformers 5
    config = ModernBertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=64, local_attention=16, pad_token_id=0,
                              bos_token_id=2, cls_token_id=2, eos_token_id=3, sep_token_id=3)
    torch.manual_seed(0)
    ModernBertModel(config).save_pretrained(tmp_path)
    adapted = load_backbone(str(tmp_path), 2, rank=4, alpha=16, dropout=0.0, target_modules=["Wqkv"],
                            device="cpu").adapted
    state = adapted.initial_state(7)
    assert torch.equal(state["head.head.norm.weight"], torch.ones(32))
    assert state["head.head.dense.weight"].std() > 0 and torch.count_nonzero(state["head.classifier.bias"]) == 0
    adapted.load_state(state)
    logits = adapted.model(input_ids=torch.tensor([[2, 8, 9, 3], [2, 20, 21, 3]])).logits
    assert not torch.allclose(logits[0], logits[1])  # the head passes the input through


def test_f1_of_a_client_whose_test_set_lacks_a_class():
    import numpy as np

    from fedlease.data.tasks import TASKS
    from fedlease.train import compute_metrics

    snli, mrpc = TASKS["snli"], TASKS["mrpc"]
    labels = np.array([0, 0, 1, 1])  # no example of snli's third class (label skew)
    assert compute_metrics(snli, labels, labels.copy(), 0.0)["macro_f1"] == 1.0  # was 2/3: the absent class as 0
    assert compute_metrics(snli, labels, np.array([0, 0, 1, 2]), 0.0)["macro_f1"] < 1.0  # predicting it costs
    negatives = np.zeros(4, dtype=int)  # a client without a positive pair
    assert compute_metrics(mrpc, negatives, negatives.copy(), 0.0)["f1"] == 1.0
    assert compute_metrics(mrpc, negatives, np.array([1, 0, 0, 0]), 0.0)["f1"] == 0.0
    assert compute_metrics(mrpc, np.array([1, 0]), np.array([0, 0]), 0.0)["f1"] == 0.0


def test_token_chunks_cut_a_batch_into_runs_within_the_budget():
    lengths = torch.tensor([30, 25, 20, 9, 8, 3, 2, 40])

    def tokens(rows: torch.Tensor) -> int:
        return len(rows) * int(lengths[rows].max())

    index = torch.arange(8)
    assert [c.tolist() for c in token_chunks(index, tokens, 0)] == [index.tolist()]
    assert [c.tolist() for c in token_chunks(index, tokens, 10_000)] == [index.tolist()]
    chunks = token_chunks(index, tokens, 60)
    assert torch.equal(torch.cat(chunks), index)  # every row once, in order
    assert all(tokens(c) <= 60 or len(c) == 1 for c in chunks)
    # greedy: no run could have taken its successor's first row
    assert all(tokens(torch.cat([a, b[:1]])) > 60 for a, b in zip(chunks, chunks[1:], strict=False))
    assert [c.tolist() for c in token_chunks(index, tokens, 35)][-1] == [7]  # a row over the budget runs alone


def budget_clients(kind: str, tiny_model: str, tiny_causal_lm: str, tmp_path) -> list:
    from conftest import tiny_instruction_config, tiny_run_config
    from fedlease.runtime.simulation import build_clients, load_partition, prepare_config

    if kind == "instructions":
        config = tiny_instruction_config(tiny_causal_lm, tmp_path, train_samples=8, tasks=["instruct_struct2text"],
                                         precision="fp32", max_length=512)  # rows of unequal lengths, uncut
    else:  # fp32: bf16 autocast rounds a part's products unlike the whole batch's
        config = tiny_run_config(tiny_model, tmp_path, tasks=["snli:1"], pair_encoding=kind, precision="fp32")
    config = prepare_config(config)
    return build_clients(config, load_partition(config)[1])[1]


@pytest.mark.parametrize("kind", ["joint", "separate", "instructions"])
def test_a_batch_over_max_batch_tokens_trains_in_parts_to_the_batchs_gradient(kind, tiny_model, tiny_causal_lm,
                                                                             tmp_path):
    client = budget_clients(kind, tiny_model, tiny_causal_lm, tmp_path)[0]
    data = client.train_data
    index = batch_indices(data.example_lengths, 8, torch.Generator().manual_seed(0))[0]
    whole = client.batch_tokens(data, index)
    params = client.adapted.set_trainable(("lora_A", "lora_B", "head") if kind != "instructions" else
                                          ("lora_A", "lora_B"))
    with torch.no_grad():  # B away from 0, so that A has gradients too
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    client.adapted.model.eval()  # no dropout: the parts must add up to the batch's gradient exactly
    results = {}
    for budget in (0, whole * 3 // 8):  # parts of unequal sizes
        client.settings = dataclasses.replace(client.settings, max_batch_tokens=budget)
        parts = token_chunks(index, functools.partial(client.batch_tokens, data), budget)
        loss = client.backward_batch(data, index, torch.amp.GradScaler(enabled=False))
        results[budget] = len(parts), float(loss), [p.grad.clone() for p in params]
        client.adapted.model.zero_grad(set_to_none=True)
    (one, loss, grads), (many, parts_loss, parts_grads) = results.values()
    assert one == 1 and many >= 2 and len({client.loss_weight(data, rows) for rows in parts}) > 1
    assert parts_loss == pytest.approx(loss, rel=1e-5)
    assert any(g.abs().sum() > 0 for g in grads)
    for g, h in zip(grads, parts_grads, strict=True):
        torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-6)


def test_max_batch_tokens_reaches_the_clients_of_a_run(tiny_model, tmp_path, monkeypatch):
    """From the command line to every client's training: a small budget splits its batches (more loss calls than
    steps), the default does not."""
    from conftest import tiny_run_config
    from fedlease.runtime.simulation import run
    from fedlease.train import LocalClient

    calls = []
    original = LocalClient.batch_loss
    monkeypatch.setattr(LocalClient, "batch_loss", lambda self, *a: calls.append(1) or original(self, *a))
    steps = {}
    for budget in (0, 48):
        calls.clear()
        out = tmp_path / str(budget)
        run(tiny_run_config(tiny_model, out, method="fedit", global_rounds=2, max_batch_tokens=budget), progress=False)
        history = json.loads((out / "training_history.json").read_text())
        trained = [c["train"] for r in history["rounds"] for c in r["clients"].values()]
        steps[budget] = len(calls), sum(int(t["steps"]) for t in trained)
    assert steps[0][0] == steps[0][1] and steps[48][0] > steps[48][1] == steps[0][1]


def test_8bit_weights_compute_in_fp16_and_refuse_bf16(monkeypatch):
    # bitsandbytes' LLM.int8 products take fp16 inputs; a bf16 one is cast (with a warning) in every call
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda) is torch.bfloat16
    assert resolve_precision("auto", cuda, "4bit") is torch.bfloat16
    assert resolve_precision("auto", cuda, "8bit") is torch.float16
    assert resolve_precision("fp16", cuda, "8bit") is torch.float16
    assert resolve_precision("fp32", cuda, "8bit") is None
    with pytest.raises(ConfigError, match="8bit"):
        resolve_precision("bf16", cuda, "8bit")


def test_a_batch_goes_to_a_gpu_through_pinned_memory_without_waiting():
    # a copy from pageable memory waits for every queued kernel: the host could not run ahead of the GPU
    class HostTensor:
        pinned, non_blocking = False, None

        def pin_memory(self):
            self.pinned = True
            return self

        def to(self, device, non_blocking=False):
            self.device, self.non_blocking = device, non_blocking
            return self

    moved = to_device(HostTensor(), torch.device("cuda"))
    assert moved.pinned and moved.non_blocking is True and moved.device == torch.device("cuda")
    on_cpu = to_device(HostTensor(), torch.device("cpu"))
    assert not on_cpu.pinned  # pinning needs CUDA; a CPU run copies nothing


def test_adamw_runs_fused_and_trains_as_the_per_parameter_loop(tiny_clients, monkeypatch):
    """The trainable parameters are updated by AdamW's fused kernel (one operation per group instead of about ten
    per parameter, and no wait for the GPU under fp16 loss scaling), which must train as the per-parameter loop
    does: same parameters after a local call, to float rounding."""
    from fedlease import train
    from fedlease.model.experts import ExpertLayout

    client = tiny_clients[1][0]
    parts = ("lora_A", "lora_B", "head")
    assert client.optimizer(parts, 1)[1].defaults["fused"] is True
    assert not train.fused_adamw([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))])
    start = {name: torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())) * 0.05
             for name, t in client.state(parts).items()}
    trained = {}
    for fused in (True, False):
        monkeypatch.setattr(train, "fused_adamw", lambda params, fused=fused: fused)
        client.apply(ExpertLayout(), start)
        client.fit(parts, seed=3)
        trained[fused] = client.state(parts)
    assert any(not torch.equal(trained[True][name], start[name]) for name in start)
    for name in start:
        torch.testing.assert_close(trained[True][name], trained[False][name], rtol=1e-5, atol=1e-6)
