"""Instruction tuning on a tiny random LLaMA built in code: prompt masking, generation, ROUGE, every method."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_causal_lm, tiny_instruction_config, write_instruction_folder
from fedlease.cli import main
from fedlease.config import RunConfig
from fedlease.data.instructions import InstructionExample
from fedlease.data.tasks import get_spec
from fedlease.errors import ConfigError
from fedlease.generation import IGNORE, PromptFormat, encode_instructions, generation_metrics, lm_batch
from fedlease.model.causal_lm import load_causal_lm
from fedlease.runtime.clients import local_client, train_settings
from fedlease.runtime.simulation import load_partition, prepare_config, run


def examples(outputs: list[str], text: str = "say it") -> list[InstructionExample]:
    return [InstructionExample(f"{text} {i}", "", out, 0) for i, out in enumerate(outputs)]


@pytest.fixture(scope="module")
def backbone(tiny_causal_lm):
    return load_causal_lm(tiny_causal_lm, rank=4, alpha=8, dropout=0.0, device="cpu")


def test_only_response_tokens_are_targets_and_the_loss_is_theirs(backbone):
    data = encode_instructions(backbone.tokenizer, examples(["yes", "no way"]), max_length=64)
    batch = lm_batch(data, torch.arange(2), torch.device("cpu"))
    ids = batch["input_ids"]
    rows, positions = batch["scored_positions"] // ids.shape[1], batch["scored_positions"] % ids.shape[1]
    targets = torch.full_like(ids, IGNORE)
    for row in range(2):
        start, end = int(data.prompt_lengths[row]), int(data.lengths[row])
        # position p is scored where it predicts a response token, p + 1: from the prompt's last token on
        assert positions[rows == row].tolist() == list(range(start - 1, end - 1))
        assert torch.equal(batch["scored_targets"][rows == row], ids[row, start:end])
        # the response is the output's characters and the end-of-sequence token
        assert backbone.tokenizer.decode(ids[row, start:end]) == ["yes", "no way"][row] + "</s>"
        targets[row, start:end] = ids[row, start:end]
    assert batch["scored_tokens"] == len(batch["scored_targets"]) == int((data.lengths - data.prompt_lengths).sum())
    config = RunConfig(tasks=["instruct_edit"], batch_size=2, lr=1e-2)
    from fedlease.generation import GenerationClient

    client = GenerationClient(0, get_spec("instruct_edit"), backbone.adapted, data, data,
                              train_settings(config, backbone), backbone.tokenizer, 4)
    logits = backbone.adapted.model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(client.batch_loss(data, torch.arange(2)), expected)


def test_a_long_instruction_is_cut_and_the_frame_and_response_kept(backbone):
    fmt = PromptFormat(backbone.tokenizer, max_length=60)
    prompt, response = fmt.example(InstructionExample("x" * 500, "", "the answer", 0))
    assert len(prompt) + len(response) <= 60
    assert backbone.tokenizer.decode(response) == "the answer</s>"
    assert backbone.tokenizer.decode(prompt).endswith("### Response:\n")


def test_a_prompt_that_fits_is_not_cut_when_only_the_response_is_long(backbone):
    fmt = PromptFormat(backbone.tokenizer, max_length=60)
    ex = InstructionExample("sum up", "", "y" * 200, 0)
    prompt, response = fmt.example(ex)
    assert "sum up" in backbone.tokenizer.decode(prompt) and len(prompt) + len(response) == 60


@pytest.mark.parametrize("room", [2, 5, 100])
def test_a_test_prompt_does_not_depend_on_its_reference(backbone, room):
    fmt = PromptFormat(backbone.tokenizer, max_length=60)
    short, middle, long = (InstructionExample("w" * 60, "", out, 0) for out in ("a", "b" * 8, "b" * 100))
    assert fmt.example(short, room)[0] == fmt.example(middle, room)[0] == fmt.example(long, room)[0]
    assert fmt.example(short)[0] != fmt.example(long)[0]  # a training row gives the prompt what the response leaves
    for ex in (short, middle, long):
        prompt, response = fmt.example(ex, room)
        assert len(prompt) + len(response) <= 60


def test_a_test_prompt_gets_the_room_the_clients_training_answers_leave(backbone):
    tok = backbone.tokenizer
    train = [InstructionExample("pick one", "", answer, 0) for answer in ("yes", "no")]
    test = [InstructionExample("w" * 200, "", "yes", 0)]
    data = encode_instructions(tok, test, 60, answers_like=train)
    answer = len(tok("yes", add_special_tokens=False)["input_ids"]) + 1  # with EOS
    assert int(data.prompt_lengths[0]) == 60 - answer  # not cut to half the room: short answers leave more
    long_answers = [InstructionExample("x", "", "z" * 300, 0)]
    half = (60 - PromptFormat(tok, 60).scaffold) // 2
    assert int(encode_instructions(tok, test, 60, answers_like=long_answers).prompt_lengths[0]) == 60 - half


def test_a_template_that_leaves_no_room_is_refused(backbone):
    with pytest.raises(ConfigError, match="no room"):
        PromptFormat(backbone.tokenizer, max_length=20)


def test_rouge_and_exact_match_on_known_strings():
    free = generation_metrics(get_spec("instruct_struct2text"), ["the cat sat", "a b"], ["the cat sat on the mat", "c"])
    # rouge1 of the first: P = 3/3, R = 3/6 -> F = 2/3; the second shares no word
    assert free["rouge1"] == pytest.approx((2 / 3) / 2) and "exact_match" not in free
    labelled = generation_metrics(get_spec("instruct_sentiment"), ["Positive.", "negative", "no"],
                                  ["positive", "negative", "positive"])
    assert labelled["exact_match"] == pytest.approx(2 / 3) and labelled["rouge1"] == pytest.approx(2 / 3)


def test_rouge_scores_any_script_and_edits_of_case_and_punctuation_are_seen():
    free = generation_metrics(get_spec("instruct_struct2text"), ["Кот сидел на ковре", "猫"], ["кот сидел", "猫"])
    assert free["rouge1"] == pytest.approx((2 * (2 / 4) * 1 / (2 / 4 + 1) + 1) / 2)  # 0 for both before
    # copying the input of a "restore the case and punctuation" edit: ROUGE cannot tell, the cased match can
    edit = generation_metrics(get_spec("instruct_edit"), ["a man sits on a bench", "A man sits on a bench."],
                              ["A man sits on a bench.", "A man  sits on a bench."])
    assert edit["rouge1"] == 1.0 and edit["exact_match_cased"] == 0.5
    assert get_spec("instruct_edit").metrics == ("rouge1", "rougeL", "exact_match_cased")


def test_training_teaches_the_response_and_generation_returns_it(tiny_causal_lm, tmp_path):
    config = prepare_config(tiny_instruction_config(tiny_causal_lm, tmp_path, tasks=["instruct_edit"], lr=3e-2,
                                                    local_epochs=30, batch_size=4))
    backbone = load_causal_lm(tiny_causal_lm, rank=8, alpha=16, dropout=0.0, device="cpu")
    data = encode_instructions(backbone.tokenizer, examples(["ok"] * 8), max_length=64)
    from fedlease.generation import GenerationClient

    client = GenerationClient(0, get_spec("instruct_edit"), backbone.adapted, data, data,
                              train_settings(config, backbone), backbone.tokenizer, 4)
    client.apply(backbone.adapted.layout, backbone.adapted.initial_state(1))
    before = client.evaluate()
    client.fit(("lora_A", "lora_B"), seed=1)
    after = client.evaluate()
    assert before["rouge1"] < 1.0 and after["rouge1"] == 1.0 and after["loss"] < before["loss"]
    assert client.generate(data) == ["ok"] * 8


def test_a_static_cache_generates_the_dynamic_caches_tokens_at_one_shape(tiny_causal_lm, monkeypatch):
    """--generation_cache static: the same greedy tokens as the default cache, through FedLEASE's expert layers
    (adaptive routing, experts that are not zero), with every batch left-padded to one width, so that a compiled
    decoding step (CUDA) is compiled for one shape, not one per batch."""
    from fedlease.generation import GenerationClient
    from fedlease.model.experts import ExpertLayout

    backbone = load_causal_lm(tiny_causal_lm, rank=4, alpha=8, dropout=0.0, device="cpu")
    adapted = backbone.adapted
    adapted.configure(ExpertLayout(num_experts=3, own_expert=1, routing="adaptive"))
    gen = torch.Generator().manual_seed(0)
    for layer in adapted.sites.values():
        for tensor in (layer.lora_A, layer.lora_B, layer.experts_A, layer.experts_B, layer.router):
            tensor.data.copy_(0.3 * torch.randn(tensor.shape, generator=gen))
    prompts = [" ".join(["say"] * (1 + 3 * i)) for i in range(5)]  # five lengths, in batches of two
    data = encode_instructions(backbone.tokenizer, [InstructionExample(p, "", "ok", 0) for p in prompts], 64)
    config = RunConfig(tasks=["instruct_edit"], eval_batch_size=2)
    widths = []
    generate = adapted.model.generate

    def recorded(**kwargs):
        widths.append((kwargs["input_ids"].shape[1], kwargs.get("cache_implementation")))
        return generate(**kwargs)

    monkeypatch.setattr(adapted.model, "generate", recorded)
    outputs = {}
    for cache in ("dynamic", "static"):
        client = GenerationClient(0, get_spec("instruct_edit"), adapted, data, data, train_settings(config, backbone),
                                  backbone.tokenizer, 8, cache)
        outputs[cache] = client.generate(data)
    assert outputs["static"] == outputs["dynamic"] and any(outputs["static"])
    dynamic, static = widths[:3], widths[3:]
    assert len({w for w, _ in dynamic}) == 3 and {c for _, c in dynamic} == {None}
    assert len({w for w, _ in static}) == 1 and {c for _, c in static} == {"static"}
    assert static[0][0] % 8 == 0 and static[0][0] >= max(w for w, _ in dynamic)


ABLATIONS = [("fedlease", {"num_experts": 4}), ("fedlease", {"num_experts": 2, "top_k": 2}),
             ("fedlease", {"num_experts": 2, "top_k": 1}), ("fedit", {"rank": 16})]


@pytest.mark.parametrize(("method", "overrides"), [(m, {}) for m in ("fedlease", "fedit", "ffa_lora", "fedsa_lora",
                                                                     "feddpa", "ifca", "local")] + ABLATIONS,
                         ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else v)
def test_every_method_and_ablation_trains_instruction_tasks(tiny_causal_lm, tmp_path, method, overrides):
    config = tiny_instruction_config(tiny_causal_lm, tmp_path / method, method=method,
                                     num_clusters=2 if method == "ifca" else 4, global_rounds=2, train_samples=8,
                                     test_samples=4, **overrides)
    result = run(config, progress=False)
    final = result.final
    assert set(final["tasks"]) == {"instruct_sentiment", "instruct_struct2text"}
    assert set(final["tasks"]["instruct_sentiment"]) == {"rouge1", "rougeL", "exact_match"}
    assert "rouge1" in final["mean"] and "ROUGE-1" in result.table
    history = json.loads((result.output_dir / "training_history.json").read_text())
    assert history["config"]["rank"] == overrides.get("rank", 8) and history["config"]["model_name"] == tiny_causal_lm
    assert (result.output_dir / "rouge1_by_round.png").is_file()
    if "num_experts" in overrides:  # K fixed, whatever the signatures say
        assert history["optimal_n_clusters"] == len(set(history["clustering"]["labels"])) == overrides["num_experts"]
    if "top_k" in overrides:
        log = (result.output_dir / "training_log.txt").read_text()
        assert f"routing: fixed top-{overrides['top_k']} of " in log


def test_a_users_jsonl_folder_becomes_tasks(tiny_causal_lm, tmp_path):
    folder = write_instruction_folder(tmp_path / "mine")
    config = prepare_config(tiny_instruction_config(tiny_causal_lm, tmp_path / "o", tasks=["reverse_words", "upper"],
                                                    instruction_dir=str(folder), train_samples=4, test_samples=2))
    _, splits = load_partition(config)
    assert [s.task for s in splits] == ["reverse_words", "upper"]
    assert splits[1].train[0].input and splits[1].train[0].output == splits[1].train[0].input.upper()
    backbone = load_causal_lm(tiny_causal_lm, rank=4, alpha=8, dropout=0.0, device="cpu")
    client = local_client(config, backbone, train_settings(config, backbone), splits[1])
    assert len(client.train_data) == 4 and client.spec.metrics == ("rouge1", "rougeL")


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err.strip()


def test_bad_instruction_input_is_one_line_and_writes_nothing(tiny_causal_lm, tiny_model, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    out = tmp_path / "out"
    common = ["--output_dir", str(out), "--train_samples", "1", "--test_samples", "1", "--no_progress"]
    code, err = run_cli(capsys, "run", "--model_name", tiny_causal_lm, "--tasks", "bad", "--instruction_dir",
                        str(folder), *common)
    assert code == 2 and err.startswith("fedlease: error: ") and f"{folder / 'train.jsonl'}:2:" in err
    assert len(err.splitlines()) == 1
    code, err = run_cli(capsys, "run", "--model_name", tiny_model, "--tasks", "instruct_edit", *common)
    assert code == 2 and "is not a causal language model" in err
    code, err = run_cli(capsys, "run", "--model_name", tiny_causal_lm, "--tasks", "snli", *common)
    assert code == 2 and "is a causal language model; classification tasks need an encoder" in err
    code, err = run_cli(capsys, "run", "--model_name", tiny_causal_lm, "--tasks", "snli", "instruct_edit", *common)
    assert code == 2 and "mixes kinds" in err
    code, err = run_cli(capsys, "run", "--model_name", tiny_causal_lm, "--tasks", "instruct_edit", "--max_length",
                        "16", *common)
    assert code == 2 and "leaving no room" in err
    assert not out.exists()


def test_a_chat_template_frames_the_prompt(tmp_path):
    template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    folder = build_tiny_causal_lm(Path(tmp_path / "chat"), chat_template=template)
    backbone = load_causal_lm(str(folder), rank=4, alpha=8, dropout=0.0, device="cpu")
    prompt, response = PromptFormat(backbone.tokenizer, 64).example(InstructionExample("hi", "there", "yo", 0))
    assert backbone.tokenizer.decode(prompt) == "<s>user\nhi\n\nthere</s>\n<s>assistant\n"
    assert backbone.tokenizer.decode(response) == "yo</s>"
    prompt, response = PromptFormat(backbone.tokenizer, 64).example(InstructionExample("h" * 300, "", "yo", 0))
    assert len(prompt) + len(response) <= 64 and backbone.tokenizer.decode(prompt).endswith("</s>\n<s>assistant\n")


def test_a_killed_instruction_run_resumes_to_the_uninterrupted_results(tiny_causal_lm, tmp_path):
    from test_resume import HARNESS, outcome

    def args(out: Path) -> list[str]:
        return ["run", "--model_name", tiny_causal_lm, "--method", "feddpa", "--tasks", "instruct_sentiment:2",
                "instruct_struct2text:2", "--global_rounds", "3", "--warmup_rounds", "1", "--train_samples", "8",
                "--test_samples", "4", "--batch_size", "4", "--max_length", "160", "--max_new_tokens", "4",
                "--lr", "0.01", "--output_dir", str(out), "--no_progress"]

    assert main(args(tmp_path / "reference")) == 0
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(HARNESS), "fit:10", *args(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert main(["run", "--resume", str(out), "--no_progress"]) == 0
    (metrics, weights), (ref_metrics, ref_weights) = outcome(out), outcome(tmp_path / "reference")
    assert metrics == ref_metrics and weights.keys() == ref_weights.keys()
    for name, tensors in weights.items():
        assert all(torch.equal(value, ref_weights[name][key]) for key, value in tensors.items()), name


def test_feddpa_weighs_a_test_prompt_without_reading_its_reference(tiny_causal_lm, tmp_path, monkeypatch):
    import dataclasses

    from fedlease.methods.feddpa import FedDPA
    from fedlease.runtime.simulation import build_clients

    config = prepare_config(tiny_instruction_config(tiny_causal_lm, tmp_path, method="feddpa", train_samples=8,
                                                    test_samples=4, tasks=["instruct_sentiment"]))
    _, clients, infos = build_clients(config, load_partition(config)[1])
    client, method, store = clients[0], FedDPA(config, infos), {}
    method.aggregate_train(0, {0: method.client_train(client, method.configure_train(0)[0], 0, store)})
    method.client_train(client, method.configure_train(1)[0], 1, store)  # now it holds a local adapter
    mixtures = []
    monkeypatch.setattr(client, "evaluate", lambda mixture=None: mixtures.append(mixture) or {})
    test, g = client.test_data, torch.Generator().manual_seed(0)
    positions = torch.arange(test.input_ids.shape[1])
    response = (positions >= test.prompt_lengths[:, None]) & (positions < test.lengths[:, None])
    for _ in range(2):  # the same prompts, each time with other reference answers after them
        ids = test.input_ids.clone()
        ids[response] = torch.randint(3, client.tokenizer.vocab_size, (int(response.sum()),), generator=g)
        client.test_data = dataclasses.replace(test, input_ids=ids)
        method.client_evaluate(client, method.configure_evaluate(1)[0], 1, store)
    client.test_data = test
    torch.testing.assert_close(mixtures[0], mixtures[1])
