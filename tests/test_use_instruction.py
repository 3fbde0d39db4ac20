"""Using an instruction run's clients: a newcomer's model placed by its own instructions, and exports to PEFT that
load onto the causal LM with fedlease's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_instruction_config
from fedlease.cli import main
from fedlease.model.experts import ExpertLayout
from fedlease.runtime.simulation import run
from fedlease.use import load_client, load_newcomer
from fedlease.use.final import recorded_metrics

# fp32 on the CPU: PEFT's logits equal fedlease's to float rounding
TOLERANCE = dict(atol=1e-5, rtol=1e-4)
PROMPTS = [("Reverse the words.", "hello world"), ("Is this review positive or negative? a dull film", "")]


def instruction_run(model: str, folder: Path, **overrides) -> Path:
    run(tiny_instruction_config(model, folder, precision="fp32", global_rounds=2, train_samples=8, test_samples=4,
                                **overrides), progress=False)
    return folder


@pytest.fixture(scope="module")
def fedlease_run(tiny_causal_lm, tmp_path_factory) -> Path:
    """FedLEASE on two instruction tasks, two of its six clients held out of training as newcomers."""
    return instruction_run(tiny_causal_lm, tmp_path_factory.mktemp("use-fedlease-instructions"),
                           tasks=["instruct_sentiment:3", "instruct_struct2text:3"], unseen_clients=2)


@pytest.fixture(scope="module")
def fedit_run(tiny_causal_lm, tmp_path_factory) -> Path:
    return instruction_run(tiny_causal_lm, tmp_path_factory.mktemp("use-fedit-instructions"), method="fedit")


def history(folder: Path) -> dict:
    return json.loads((folder / "training_history.json").read_text())


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def demonstrations(examples) -> list[dict]:
    return [{"instruction": e.instruction, "input": e.input, "output": e.output} for e in examples]


def held_out(folder: Path) -> list[tuple]:
    """Each client the run held out of training, rebuilt from its final file, with its task."""
    tasks = history(folder)["config"]["tasks"]
    return [(load_client(folder, cid), tasks[cid]) for cid in history(folder)["unseen_clients"]]


def test_an_instruction_newcomer_placed_by_its_own_data_gets_what_the_run_gave_that_newcomer(fedlease_run, tmp_path):
    """Given the instructions of a client the run held out, --client new rebuilds exactly the model the run
    evaluated it with: FedLEASE places it by its data signature among K >= 2 clusters (the two held-out clients
    went to different ones)."""
    clients = held_out(fedlease_run)
    assert len({recorded_metrics(fedlease_run, c.final.client)["expert"] for c, _ in clients}) == 2
    for client, task in clients:
        assert client.final.unseen and client.final.layout.num_experts >= 2
        model, placed = load_newcomer(fedlease_run, client.examples("train"), task=task)
        assert placed["expert"] == recorded_metrics(fedlease_run, client.final.client)["expert"]
        assert model.final.layout == client.final.layout and set(model.final.state) == set(client.final.state)
        for key, value in client.final.state.items():
            torch.testing.assert_close(model.final.state[key], value, rtol=0, atol=0)
        test = client.examples("test")
        instructions, inputs = [e.instruction for e in test], [e.input for e in test]
        want = client.generate(instructions, inputs)
        assert model.generate(instructions, inputs) == want
    # through the command line: the newcomer's instructions with their responses in, answers out
    data = jsonl(tmp_path / "mine.jsonl", demonstrations(client.examples("train")))
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"instruction": i, "input": x} for i, x in zip(instructions, inputs,
                                                                                                  strict=True)])
    out = tmp_path / "answers.jsonl"
    assert main(["generate", str(fedlease_run), "--client", "new", "--data", str(data), "--task", task, "--input",
                 str(prompts), "--output", str(out), "--no_progress"]) == 0
    assert [json.loads(line)["response"] for line in out.read_text().splitlines()] == want


def test_instruction_newcomer_bad_input(fedlease_run, tmp_path, capsys):
    wrong = jsonl(tmp_path / "wrong.jsonl", [{"instruction": "Is it good?", "output": "positive"},
                                             {"instruction": "Is it good?", "output": "maybe"}])
    bare = jsonl(tmp_path / "bare.jsonl", [{"instruction": "Is it good?"}])
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"instruction": "hi"}])
    out = tmp_path / "answers.jsonl"
    for command, args, message in (
            ("generate", ["--data", str(wrong), "--task", "instruct_sentiment"],
             "wrong.jsonl:2: \"output\" must be one of this task's answers: negative, positive"),
            ("generate", ["--data", str(bare), "--task", "instruct_sentiment"],
             "bare.jsonl:1: each line must be a JSON object with a string \"instruction\""),
            ("generate", ["--data", str(wrong)], "pass --task"),
            ("generate", ["--data", str(wrong), "--task", "snli"], "the run trained"),
            ("predict", ["--data", str(wrong), "--task", "instruct_sentiment"], "use fedlease generate")):
        assert main([command, str(fedlease_run), "--client", "new", "--input", str(prompts), "--output", str(out),
                     *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert main(["generate", str(fedlease_run), "--client", "new", "--data", str(wrong), "--split", "test"]) == 2
    assert "--client new has no split" in capsys.readouterr().err
    assert not out.exists()


def peft_logits(folder: Path, base: str, tokens) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(folder)).eval()
    with torch.no_grad():
        return model(**tokens).logits


def fedlease_logits(model, layout: ExpertLayout, state, tokens) -> torch.Tensor:
    model.client.apply(layout, state)
    adapted = model.backbone.adapted.model.eval()
    with torch.no_grad():
        return adapted(**tokens).logits


def prompt_tokens(model):
    """The prompts as fedlease renders them, right-padded as in training."""
    from fedlease.data.instructions import InstructionExample, prompt_text
    from fedlease.generation import PromptFormat

    fmt = PromptFormat(model.backbone.tokenizer, model.config.max_length)
    texts = [fmt.render(prompt_text(InstructionExample(i, x, "", 0))) for i, x in PROMPTS]
    return model.backbone.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=not fmt.chat)


def test_export_of_an_instruction_clients_adapter_loads_onto_the_causal_lm_in_peft(fedit_run, tiny_causal_lm,
                                                                                   tmp_path):
    folder = tmp_path / "export"
    assert main(["export", str(fedit_run), "--client", "1", "--out", str(folder), "--merge"]) == 0
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not config.get("modules_to_save")
    assert not (folder / "head.safetensors").exists()
    model = load_client(fedit_run, 1)
    assert config["base_model_name_or_path"] == model.config.model_name
    tokens = prompt_tokens(model)
    want = fedlease_logits(model, model.final.layout, model.final.state, tokens)
    torch.testing.assert_close(peft_logits(folder / "adapter", tiny_causal_lm, tokens), want, **TOLERANCE)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(folder / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**tokens).logits, want, **TOLERANCE)
    info = json.loads((folder / "fedlease_client.json").read_text())
    assert info["metrics"] == recorded_metrics(fedit_run, 1) and "rouge1" in info["metrics"]


def test_export_of_fedlease_instruction_experts_with_routing_forced_to_the_own_expert(fedlease_run, tiny_causal_lm,
                                                                                      tmp_path):
    cid = next(c for c in range(6) if c not in history(fedlease_run)["unseen_clients"])
    folder = tmp_path / "export"
    assert main(["export", str(fedlease_run), "--client", str(cid), "--out", str(folder)]) == 0
    model = load_client(fedlease_run, cid)
    layout = model.final.layout
    assert sorted(p.name for p in folder.glob("expert_*")) == [f"expert_{k}" for k in range(layout.num_experts)]
    assert (folder / "router.safetensors").exists() and not (folder / "head.safetensors").exists()
    own = {k: v for k, v in model.final.state.items() if k.endswith((".lora_A", ".lora_B"))}
    tokens = prompt_tokens(model)
    want = fedlease_logits(model, ExpertLayout(), own, tokens)
    torch.testing.assert_close(peft_logits(folder / f"expert_{layout.own_expert}", tiny_causal_lm, tokens), want,
                               **TOLERANCE)
    other = (layout.own_expert + 1) % layout.num_experts
    assert not torch.allclose(peft_logits(folder / f"expert_{other}", tiny_causal_lm, tokens), want, atol=1e-5)
    card = (folder / "README.md").read_text()
    for task, licence in (("instruct_sentiment", "distributed for research, no licence stated"),
                          ("instruct_struct2text", "E2E NLG (Novikova et al., 2017)")):
        assert task in card and licence in card
    assert card.count("CC BY-SA 4.0") == 1  # E2E's licence, named once: in its task's row


def test_export_of_a_newcomer_is_the_export_of_the_model_the_run_gave_it(fedlease_run, tmp_path, capsys):
    client, task = held_out(fedlease_run)[-1]
    data = jsonl(tmp_path / "mine.jsonl", demonstrations(client.examples("train")))
    new, run_given = tmp_path / "new", tmp_path / "held-out"
    assert main(["export", str(fedlease_run), "--client", "new", "--data", str(data), "--task", task, "--out",
                 str(new)]) == 0
    assert main(["export", str(fedlease_run), "--client", str(client.final.client), "--out", str(run_given)]) == 0
    files = sorted(p.relative_to(new).as_posix() for p in new.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(run_given).as_posix() for p in run_given.rglob("*.safetensors"))
    for name in files:
        a, b = load_file(new / name), load_file(run_given / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((new / "fedlease_client.json").read_text())
    assert info["client"] == "new" and info["unseen"] and "own 8 examples" in info["measured"]
    assert "# fedlease newcomer: " + task in (new / "README.md").read_text()
    # bad input: an existing folder is refused before the newcomer is placed, and nothing else is written
    assert main(["export", str(fedlease_run), "--client", "new", "--data", str(data), "--task", task, "--out",
                 str(new)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(fedlease_run), "--client", "new", "--task", task, "--out", str(tmp_path / "x")]) == 2
    assert "--client new needs --data" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_recorded_rouge_is_the_rouge_of_what_the_trained_client_generates(tiny_causal_lm, tmp_path):
    """The run's final metrics for a client are ROUGE (rouge-score's own scorer, stemmed, called here directly) of
    the responses its reloaded model generates for its test prompts against their references; the run trains
    long enough that some responses are right and some are not, so the means are neither 0 nor 1."""
    from rouge_score import rouge_scorer

    folder = tmp_path / "run"
    run(tiny_instruction_config(tiny_causal_lm, folder, precision="fp32", method="fedit", global_rounds=2,
                                tasks=["instruct_sentiment:2"], train_samples=8, test_samples=8, lr=5e-2,
                                local_epochs=40, batch_size=2, max_new_tokens=12), progress=False)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    seen = []
    for cid in (0, 1):
        metrics, rows = load_client(folder, cid).evaluate("test")
        recorded = recorded_metrics(folder, cid)
        scores = [scorer.score(row["reference"], row["response"]) for row in rows]
        assert len(rows) == 8
        for name in ("rouge1", "rougeL"):
            mean = sum(s[name].fmeasure for s in scores) / len(scores)
            assert recorded[name] == pytest.approx(mean, abs=1e-9) and metrics[name] == pytest.approx(mean, abs=1e-9)
            seen.append(mean)
    assert 0 < max(seen) and min(seen) < 1
