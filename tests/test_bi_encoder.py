"""A sentence-transformers backbone reads each text on its own (Sentence-BERT), a plain one reads pairs jointly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_model, tiny_run_config
from fedlease.data.tasks import Example
from fedlease.model.backbone import load_backbone
from fedlease.model.bi_encoder import BiEncoderClassifier, sentence_transformers_pooling
from fedlease.runtime.simulation import build_clients, load_partition, prepare_config, run
from fedlease.train import LocalClient, TrainSettings, batch_indices, encode, make_batch

PAIRS = [Example("a cat sat on the mat", "the cat sat", 1), Example("dogs bark", "it rains today in paris", 0),
         Example("x", "a much longer second sentence than the first one", 1)]


@pytest.fixture(scope="module")
def tiny_sentence_model(tmp_path_factory) -> str:
    """The tiny BERT as a sentence-transformers folder with mean pooling."""
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-st"))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return str(folder)


def backbone(model: str, **kwargs):
    return load_backbone(model, 3, rank=2, alpha=4.0, dropout=0.0, device="cpu", **kwargs)


def test_auto_finds_a_sentence_transformers_folder(tiny_sentence_model, tiny_model, tmp_path):
    assert sentence_transformers_pooling(tiny_sentence_model) == "mean"
    assert sentence_transformers_pooling(tiny_model) is None
    st = backbone(tiny_sentence_model)
    assert st.pair_encoding == "separate" and isinstance(st.adapted.model, BiEncoderClassifier)
    assert set(st.adapted.head) == {"classifier.weight", "classifier.bias"}
    assert st.adapted.head["classifier.weight"].shape == (3, 4 * 32)  # [u, v, |u-v|, u*v]
    # what is trained: the LoRA and the new head; never the encoder (its untrained pooler included)
    trained = {id(p) for p in st.adapted.set_trainable(("lora_A", "lora_B", "head"))}
    named = {name for name, p in st.adapted.model.named_parameters() if id(p) in trained}
    assert {"classifier.weight", "classifier.bias"} <= named
    assert all(n.startswith("classifier.") or n.endswith((".lora_A", ".lora_B")) for n in named)
    assert backbone(tiny_model).pair_encoding == "joint"
    assert backbone(tiny_sentence_model, pair_encoding="joint").pair_encoding == "joint"
    assert backbone(tiny_model, pair_encoding="separate").pair_encoding == "separate"
    cls = tmp_path / "cls"
    shutil.copytree(tiny_sentence_model, cls)
    (cls / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert backbone(str(cls)).adapted.model.pooling == "cls"


def test_pairs_are_embedded_separately_and_classified_from_u_v_difference_product(tiny_sentence_model):
    bb = backbone(tiny_sentence_model)
    model = bb.adapted.model.eval()
    state = bb.adapted.initial_state(seed=1)
    state = {k: torch.randn_like(v) if k.endswith((".lora_B", "classifier.weight")) else v for k, v in state.items()}
    bb.adapted.load_state(state)  # a non-zero LoRA: the adapted encoder is what gets pooled
    data = encode(bb.tokenizer, PAIRS, max_length=32, separate_pairs=True)
    assert data.second is not None and data.token_type_ids is None
    settings = TrainSettings(1e-3, 0.0, 2, 1, 1.0, 2, torch.device("cpu"))
    client = LocalClient(0, None, bb.adapted, data, data, settings)

    def sentence(text: str) -> torch.Tensor:
        enc = bb.tokenizer(text, return_tensors="pt", truncation=True, max_length=32)  # cut as encode cuts
        hidden = model.encoder(**enc).last_hidden_state[0]
        return hidden.mean(0)

    with torch.no_grad():
        for index in batch_indices(data.example_lengths, 2, None):  # rows of different lengths in one batch
            batch = make_batch(data, index, settings.device)
            assert batch["texts_per_example"] == 2 and batch["input_ids"].shape[0] == 2 * len(index)
            logits = model(**batch).logits
            for row, i in enumerate(index.tolist()):
                u, v = sentence(PAIRS[i].text_a), sentence(PAIRS[i].text_b)
                expected = F.linear(torch.cat([u, v, (u - v).abs(), u * v]), state["head.classifier.weight"],
                                    state["head.classifier.bias"])
                torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)
                # the data signature of a pair is the mean of its two sentence embeddings
                torch.testing.assert_close(client.embed(data.subset(torch.tensor([i])))[0], (u + v) / 2,
                                           rtol=1e-4, atol=1e-4)
    single = encode(bb.tokenizer, [Example("only one text", None, 0)], max_length=32, separate_pairs=True)
    assert single.second is None
    with torch.no_grad():
        u = sentence("only one text")
        expected = F.linear(torch.cat([u, u, torch.zeros_like(u), u * u]), state["head.classifier.weight"],
                            state["head.classifier.bias"])
        torch.testing.assert_close(model(**make_batch(single, torch.tensor([0]), settings.device)).logits[0],
                                   expected, rtol=1e-4, atol=1e-4)


def test_a_federated_run_on_a_bi_encoder(tiny_sentence_model, tmp_path):
    config = tiny_run_config(tiny_sentence_model, tmp_path / "run", global_rounds=2)
    history = json.loads((run(config, progress=False).output_dir / "training_history.json").read_text())
    assert len(history["rounds"]) == 2 and history["clustering"]["signature"].startswith("embedding")
    prepared = prepare_config(config)
    _, clients, _ = build_clients(prepared, load_partition(prepared)[1])
    assert clients[2].train_data.second is not None  # snli pairs, encoded separately
    assert clients[0].train_data.second is None


def test_feddpa_mixes_per_example_on_separately_encoded_pairs(tiny_sentence_model, tmp_path):
    # a batch of pairs holds 2B rows (first texts, then second texts): each example's weights cover both
    config = tiny_run_config(tiny_sentence_model, tmp_path / "run", method="feddpa", global_rounds=2)
    history = json.loads((run(config, progress=False).output_dir / "training_history.json").read_text())
    assert history["rounds"][-1]["clients"]["2"]["eval"]["accuracy"] >= 0  # snli, with its local adapter mixed in
