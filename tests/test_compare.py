"""`fedlease compare`: every method on the same partition, one table, honest about spread and traffic."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_run_config
from fedlease.cli import main
from fedlease.compare import compare, parse_spec, plan
from fedlease.config import METHOD_NAMES, RunConfig
from fedlease.data.tasks import get_spec
from fedlease.errors import ConfigError
from fedlease.report.comparison import MethodResult, row_name


def test_compare_tabulates_every_method_and_task(tiny_model, tmp_path):
    base = tiny_run_config(tiny_model, tmp_path / "cmp", global_rounds=2, num_clusters=2)
    specs = [*METHOD_NAMES, "fedit:rank=16", "fedlease:top_k=1"]
    table = compare(base, specs, [3, 4], progress=False)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    header = rows[0]
    assert "rotten_tomatoes" in header and "snli" in header and "avg" in header
    # each FedLEASE row names the allocation it ran (here the default, the data signature, not the paper's)
    names = [f"{spec} (data signature)" if spec.startswith("fedlease") else spec for spec in specs]
    for name in names:
        assert any(row.startswith(f"| {name} |") for row in rows), name
    assert "±" in table  # two seeds: mean ± std
    with (tmp_path / "cmp" / "comparison.csv").open() as handle:
        records = {row["method"]: row for row in csv.DictReader(handle)}
    assert set(records) == set(names)
    records["fedlease"] = records["fedlease (data signature)"]
    upload = "upload_bytes_per_client_round_after_warmup_mean"
    assert float(records["local"][upload]) == 0.0
    assert float(records["fedit:rank=16"][upload]) > float(records["fedit"][upload])
    # FedIT uploads its LoRA and head each round: their fp32 bytes, counted from the model's shape (one head as
    # wide as the widest label set, snli's three classes)
    for spec, rank in (("fedit", 4), ("fedit:rank=16", 16)):
        assert float(records[spec][upload]) == lora_and_head_bytes(tiny_model, rank, get_spec("snli").num_labels)
    assert float(records["fedlease"]["download_bytes_per_client_downloading_round_mean"]) > 0
    # the averages and the oracle best round of every row, recomputed from the clients' evaluations per round
    for spec, name in zip(specs, names, strict=True):
        finals, oracles, best_rounds = [], [], []
        for seed in (3, 4):
            history = json.loads((tmp_path / "cmp" / parse_spec(spec).folder / f"seed_{seed}"
                                  / "training_history.json").read_text())
            averages = [average_over_tasks(r["clients"]) for r in history["rounds"]]
            finals.append(averages[-1])
            oracles.append(max(averages))
            best_rounds.append(history["rounds"][averages.index(max(averages))]["round"])
        record = records[name]
        assert float(record["average_mean"]) == pytest.approx(np.mean(finals)), name
        assert float(record["oracle_best_average_mean"]) == pytest.approx(np.mean(oracles)), name
        assert record["oracle_best_round"] == " ".join(map(str, best_rounds)), name
    assert "oracle best-round avg (picked on test)" in table and "download MB / client / downloading round" in table
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 0
    # every method saw the same partition
    partitions = set()
    for spec in ("fedlease", "ifca"):
        history = json.loads((tmp_path / "cmp" / spec / "seed_3" / "training_history.json").read_text())
        partitions.add(json.dumps(history["clients"]))
    assert len(partitions) == 1


def lora_and_head_bytes(model: str, rank: int, classes: int) -> int:
    """The fp32 bytes of rank-``rank`` LoRA A and B on query and value of every layer of the tiny BERT, and of a
    head (weight and bias) for ``classes`` classes."""
    config = json.loads((Path(model) / "config.json").read_text())
    width, layers = config["hidden_size"], config["num_hidden_layers"]
    return 4 * (layers * 2 * (2 * rank * width) + classes * width + classes)


def average_over_tasks(clients: dict) -> float:
    """A round's average: the mean over tasks of the mean accuracy of the task's evaluated clients."""
    by_task: dict[str, list[float]] = {}
    for client in clients.values():
        if client["eval"] is not None:
            by_task.setdefault(client["task"], []).append(client["eval"]["accuracy"])
    return float(np.mean([np.mean(values) for values in by_task.values()]))


def test_a_fedlease_row_names_its_allocation_and_other_rows_their_spec():
    assert row_name("fedlease", {"method": "fedlease", "allocation": "embedding"}) == "fedlease (data signature)"
    assert row_name("fedlease:allocation=paper", {"method": "fedlease", "allocation": "paper"}) \
        == "fedlease (paper: LoRA-B)"
    assert row_name("fedlease:top_k=1, allocation=paper", {"method": "fedlease", "allocation": "paper"}) \
        == "fedlease:top_k=1 (paper: LoRA-B)"
    assert row_name("fedit:rank=16", {"method": "fedit", "allocation": "embedding"}) == "fedit:rank=16"
    result = MethodResult("fedlease:allocation=paper")
    final = {"tasks": {}, "mean": {"accuracy": 0.5}, "oracle_best_mean": {"accuracy": 0.5}, "oracle_best_round": 0}
    result.add(1, {**history(["adaptive"], [[1]], [[1]], final), "config": {"method": "fedlease",
                                                                             "allocation": "paper"}}, 1.0)
    assert result.label == "fedlease (paper: LoRA-B)"


def history(phases: list[str], downloads: list[list[int]], uploads: list[list[int]], final: dict) -> dict:
    rounds = [{"phase": phase, "clients": {str(c): {"download_bytes": d, "upload_bytes": u}
                                           for c, (d, u) in enumerate(zip(down, up, strict=True))}}
              for phase, down, up in zip(phases, downloads, uploads, strict=True)]
    return {"rounds": rounds, "final": final}


def test_traffic_per_round_counts_the_rounds_that_move_it_and_the_total_the_whole_run():
    final = {"tasks": {}, "mean": {"accuracy": 0.5}, "oracle_best_mean": {"accuracy": 0.75}, "oracle_best_round": 2}
    result = MethodResult("fedlease")
    # two warmup rounds download nothing; in round 4 one of the two clients failed before uploading
    result.add(1, history(["warmup", "warmup", "adaptive", "adaptive"], [[0, 0], [0, 0], [90, 90], [60, 60]],
                          [[10, 10], [10, 10], [30, 30], [20, 0]], final), 1.0)
    assert result.download_bytes_per_client_downloading_round == [75.0]  # not (0 + 0 + 90 + 60) / 4
    assert result.upload_bytes_per_client_round_after_warmup == [(30 + 10) / 2]
    assert result.total_bytes_whole_run == [4 * 10 + 60 + 180 + 120 + 20]
    history_with_final = history(["federated"] * 2, [[0, 0], [8, 8]], [[4, 4], [4, 4]], final)
    history_with_final["rounds"][-1]["clients"]["0"]["final_evaluation_download_bytes"] = 8
    counted = MethodResult("fedit")
    counted.add(1, history_with_final, 1.0)
    assert counted.total_bytes_whole_run == [4 * 4 + 16 + 8]  # the separate final evaluation's download too
    assert counted.total_counts_final_download == [True] and result.total_counts_final_download == [False]
    assert result.oracle_best_average == [0.75] and result.oracle_best_round == [2]
    baseline = MethodResult("fedit")
    baseline.add(1, history(["federated"] * 2, [[0, 0], [8, 8]], [[4, 4], [4, 4]], final), 1.0)
    # no warmup, and the first round downloads nothing (each client builds the seeded start): 8, not (0 + 8) / 2
    assert baseline.download_bytes_per_client_downloading_round == [8.0]
    assert baseline.upload_bytes_per_client_round_after_warmup == [4.0]  # no warmup: every round
    nothing = MethodResult("local")
    nothing.add(1, history(["federated"] * 2, [[0, 0], [0, 0]], [[0, 0], [0, 0]], final), 1.0)
    assert nothing.download_bytes_per_client_downloading_round == [0.0]


def test_totals_short_of_the_final_download_and_mixed_precisions_are_said(tmp_path):
    from fedlease.config import RunConfig
    from fedlease.report.comparison import write_comparison

    final = {"tasks": {"snli": {"accuracy": 0.5}}, "mean": {"accuracy": 0.5}, "oracle_best_mean": {"accuracy": 0.5},
             "oracle_best_round": 1}

    def run(counted: bool, precision: str) -> dict:
        ran = history(["federated"], [[8]], [[4]], final)
        if counted:
            ran["rounds"][-1]["clients"]["0"]["final_evaluation_download_bytes"] = 8
        return {**ran, "precision": precision}

    old, new = MethodResult("fedit"), MethodResult("fedsa_lora")
    old.add(1, run(False, "fp32"), 1.0)
    old.add(2, run(True, "fp32"), 1.0)
    new.add(1, run(True, "fp32"), 1.0)
    new.add(2, run(True, "bf16"), 1.0)
    table = write_comparison(tmp_path, [old, new], RunConfig(tasks=["snli"]))
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.count("|") > 5 and "MB" not in line}
    assert rows["| fedit"].rstrip(" |").split(" | ")[-3].endswith(" *")  # the total of the row that lacks it
    assert not rows["| fedsa_lora"].rstrip(" |").split(" | ")[-3].endswith("*")
    assert "leaves out the final evaluation's download" in table
    assert "precision mixed: bf16 (fedsa_lora); fp32 (fedit, fedsa_lora)" in table
    alone = write_comparison(tmp_path, [old], RunConfig(tasks=["snli"]))
    assert "precision fp32." in alone


def test_a_run_whose_last_round_lost_a_whole_task_is_marked(tmp_path):
    from fedlease.config import RunConfig
    from fedlease.report.comparison import write_comparison

    results = []
    for label, tasks in (("fedit", {"snli": {"accuracy": 0.5}, "sst2": {"accuracy": 0.9}}),
                         ("fedsa_lora", {"sst2": {"accuracy": 0.9}})):  # both snli clients missed the last round
        final = {"tasks": tasks, "mean": {"accuracy": 0.7}, "oracle_best_mean": {"accuracy": 0.7},
                 "oracle_best_round": 1}
        ran = {**history(["federated"], [[0]], [[4]], final), "clients": [{"task": "snli"}, {"task": "sst2"}]}
        results.append(MethodResult(label))
        results[-1].add(1, ran, 1.0)
    table = write_comparison(tmp_path, results, RunConfig(tasks=["snli", "sst2"]))
    assert "| fedsa_lora | - | 90.00 | 70.00 † |" in table and "| fedit | 50.00 | 90.00 | 70.00 |" in table
    assert "(fedsa_lora seed 1: snli)" in table


def test_float_noise_is_a_tie_not_a_lead(tmp_path):
    from fedlease.config import RunConfig
    from fedlease.report.comparison import write_comparison

    results = []
    for label, average in (("fedsa_lora", 0.73875), ("fedit", 0.7387499999999999)):  # 591 of 800, summed twice
        final = {"tasks": {"snli": {"accuracy": average}}, "mean": {"accuracy": average},
                 "oracle_best_mean": {"accuracy": average}, "oracle_best_round": 1}
        results.append(MethodResult(label))
        results[-1].add(1, history(["federated"], [[0]], [[4]], final), 1.0)
    table = write_comparison(tmp_path, results, RunConfig(tasks=["snli"]))
    assert "| 1 | 73.88 | 73.88 |" in table
    assert "| fedit | 1 | 0.00 | 0 of 1 (1 tied) |" in table


def test_histories_written_before_the_oracle_rename_are_read():
    result = MethodResult("fedit")
    old = {"tasks": {}, "mean": {"accuracy": 0.5}, "best_mean": {"accuracy": 0.625}, "best_round": 3}
    result.add(1, history(["federated"], [[0]], [[4]], old), 1.0)
    assert result.oracle_best_average == [0.625] and result.oracle_best_round == [3]


def test_rows_name_their_seeds_when_methods_ran_with_different_seeds(tmp_path):
    from fedlease.config import RunConfig
    from fedlease.report.comparison import write_comparison

    final = {"tasks": {"snli": {"accuracy": 0.5}}, "mean": {"accuracy": 0.5}, "oracle_best_mean": {"accuracy": 0.5},
             "oracle_best_round": 1}
    results = [MethodResult("fedlease"), MethodResult("ifca")]
    for seed in (1, 2, 3):
        results[0].add(seed, history(["federated"], [[0]], [[4]], final), 1.0)
    results[1].add(1, history(["federated"], [[0]], [[4]], final), 1.0)
    table = write_comparison(tmp_path, results, RunConfig(tasks=["snli"]))
    assert "| fedlease (seeds 1 2 3) |" in table and "| ifca (seed 1) |" in table
    assert "the seeds each row names" in table
    same = write_comparison(tmp_path, results[:1], RunConfig(tasks=["snli"]))
    assert "3 seed(s): 1 2 3" in same and "| fedlease |" in same


def test_methods_are_compared_seed_by_seed_with_the_experts_chosen(tmp_path):
    from fedlease.config import RunConfig
    from fedlease.report.comparison import write_comparison

    def run(average: float, labels: list[int] | None = None) -> dict:
        final = {"tasks": {"snli": {"accuracy": average}}, "mean": {"accuracy": average},
                 "oracle_best_mean": {"accuracy": average}, "oracle_best_round": 1}
        ran = history(["federated"], [[0]], [[4]], final)
        ran["clients"] = [{"task": task} for task in ("snli", "snli", "sst2", "sst2")]
        ran["clustering"] = None if labels is None else {"num_clusters": len(set(labels)), "labels": labels}
        return ran

    fedlease, fedit = MethodResult("fedlease"), MethodResult("fedit")
    for seed, average, labels in ((1, 0.70, [0, 0, 1, 1]), (2, 0.60, [0, 1, 0, 1]), (3, 0.80, [0, 0, 1, 1])):
        fedlease.add(seed, run(average, labels), 1.0)
    for seed, average in ((1, 0.65), (2, 0.62)):  # seed 3 did not run
        fedit.add(seed, run(average), 1.0)
    table = write_comparison(tmp_path, [fedlease, fedit], RunConfig(tasks=["snli"]))
    assert "| 1 | 70.00 (K = 2, ARI 1.00) | 65.00 |" in table
    assert "| 2 | 60.00 (K = 2, ARI -0.50) | 62.00 |" in table  # the clusters cut across the tasks
    assert "| 3 | 80.00 (K = 2, ARI 1.00) | - |" in table
    # paired over seeds 1 and 2 only: differences +5 and -2
    assert "| fedit | 1 2 | 1.50 ± 4.95 | 1 of 2 |" in table
    with (tmp_path / "comparison.csv").open() as handle:
        records = {row["method"]: row for row in csv.DictReader(handle)}
    assert records["fedlease"]["allocation_per_seed"] == "K = 2, ARI 1.00; K = 2, ARI -0.50; K = 2, ARI 1.00"
    assert records["fedit"]["average_per_seed"] == "0.6500 0.6200"
    # one task over all clients (label skew): the index against the tasks means nothing; only K is said
    single = run(0.5, [0, 1, 1, 1])
    single["clients"] = [{"task": "sst2"}] * 4
    alone = MethodResult("fedlease")
    alone.add(1, single, 1.0)
    assert "| 1 | 50.00 (K = 2) |" in write_comparison(tmp_path, [alone], RunConfig(tasks=["sst2"]))


def test_method_specs():
    spec = parse_spec("fedlease:num_experts=4,top_k=2")
    assert (spec.method, spec.overrides) == ("fedlease", {"num_experts": 4, "top_k": 2})
    assert parse_spec("fedit:target_modules=query").overrides == {"target_modules": ["query"]}
    for bad, match in (("fedit:rank=x", "not a valid int"), ("fedit:ranks=4", "known setting"),
                       ("fedit:seed=3", "same for every method")):
        with pytest.raises(ConfigError, match=match):
            parse_spec(bad)


def test_compare_checks_every_spec_before_running(capsys, tmp_path):
    code = main(["compare", "--methods", "fedit", "nonsense", "--output_dir", str(tmp_path / "o")])
    assert code == 2
    assert "unknown method 'nonsense'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_setting_a_method_does_not_use_is_refused_and_a_comparisons_flag_goes_to_the_methods_using_it(
        capsys, tmp_path):
    for methods, extra, match in (
            (["fedit:top_k=2"], [], "method spec 'fedit:top_k=2': top_k does not apply to fedit: only --method "
                                    "fedlease uses it"),
            (["fedit", "fedit:allocation=embedding"], [], "allocation does not apply to fedit"),  # even the default
            (["fedlease:allocation=paper,min_silhouette=0.3"], [], "only --allocation embedding uses it"),
            (["fedit", "fedlease"], ["--num_clusters", "2"],
             "--num_clusters 2 does not apply to any method compared: only --method ifca uses it"),
            (["fedit"], ["--quantization", "4bit"], "--quantization 4bit does not apply")):
        assert main(["compare", "--methods", *methods, *extra, "--output_dir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("fedlease: error: ") and match in err[-1], err
    assert not (tmp_path / "o").exists()
    runs = plan(RunConfig(num_clusters=2, output_dir=str(tmp_path / "o")), ["fedit", "ifca", "ifca:num_clusters=3"],
                [1])
    assert [config.num_clusters for _, _, config in runs] == [4, 2, 3]  # fedit runs (and records) its default


def test_a_run_listed_twice_is_refused_before_anything_runs(capsys, tmp_path):
    for extra, match in ((["--methods", "fedit", "--seeds", "1", "1"], "--seeds lists a seed twice"),
                         (["--methods", "fedit:rank=16,lr=0.001", "fedit:rank=16, lr=0.001"],
                          "lists a method twice: 'fedit:rank=16,lr=0.001' and 'fedit:rank=16, lr=0.001'")):
        assert main(["compare", *extra, "--output_dir", str(tmp_path / "o")]) == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def compare_args(model: str, out, *extra: str) -> list[str]:
    return ["compare", "--model_name", model, "--methods", "fedit", "fedlease", "local",
            "--tasks", "rotten_tomatoes:2", "snli:2", "--global_rounds", "3", "--warmup_rounds", "1",
            "--train_samples", "24", "--test_samples", "12", "--batch_size", "8", "--max_length", "24",
            "--lr", "0.01", "--seed", "5", "--output_dir", str(out), "--no_progress", *extra]


def accuracy_rows(out) -> list[str]:
    table = (out / "comparison.md").read_text().split("\n\n")[1]  # the first table: accuracy per task
    return [line for line in table.splitlines() if line.startswith("| ")]


def test_killed_comparison_resumes(tiny_model, tmp_path):
    """Killed twice (fedlease before its first round was recorded, then after it), resumed: the same table as
    an uninterrupted comparison, and the finished fedit run is kept, not run again."""
    from test_resume import HARNESS

    reference = tmp_path / "reference"
    assert main(compare_args(tiny_model, reference)) == 0
    out = tmp_path / "cmp"
    # fedit: 4 clients x 3 rounds = 12 local trainings; the 14th is fedlease's round 1, client 2
    # the second process (resuming) keeps fedit and restarts fedlease; its 6th fit is fedlease's round 2
    for point, extra in (("fit:14", ()), ("fit:6", ("--resume",))):
        proc = subprocess.run([sys.executable, str(HARNESS), point, *compare_args(tiny_model, out, *extra)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    fedit_history = (out / "fedit" / "seed_5" / "training_history.json").read_bytes()
    assert not (out / "comparison.md").exists() and not (out / "local").exists()
    assert main(compare_args(tiny_model, out, "--resume")) == 0
    assert (out / "fedit" / "seed_5" / "training_history.json").read_bytes() == fedit_history
    assert "resuming" in (out / "fedlease" / "seed_5" / "training_log.txt").read_text()
    assert accuracy_rows(out) == accuracy_rows(reference)


def test_comparison_resume_refuses_other_settings(tiny_model, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(compare_args(tiny_model, out)) == 0
    capsys.readouterr()
    assert main(compare_args(tiny_model, out, "--resume", "--lr", "0.02")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lr 0.02 (the run used 0.01)" in err
    assert main(compare_args(tiny_model, tmp_path / "missing", "--resume")) == 2
    assert "holds no comparison to continue" in capsys.readouterr().err


def merge(folders, into, *methods: str) -> str | None:
    """benchmarks/merge_comparison.py run in this process: None when it succeeds, else why it refused."""
    import importlib.util
    from unittest import mock

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_comparison.py"
    spec = importlib.util.spec_from_file_location("merge_comparison", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = [str(script), *map(str, folders), "--into", str(into), "--methods", *methods]
    with mock.patch.object(sys, "argv", argv):
        try:
            module.main()
        except SystemExit as refused:
            return str(refused)
    return None


def test_merging_refuses_runs_of_other_settings_other_methods_and_twice_finished_runs(tmp_path):
    from fedlease.config import RunConfig

    final = {"tasks": {"snli": {"accuracy": 0.5}}, "mean": {"accuracy": 0.5}, "oracle_best_mean": {"accuracy": 0.5},
             "oracle_best_round": 1}

    def finished(folder, label: str, seed: int, **settings) -> None:
        config = RunConfig(**{"tasks": ["snli", "snli"], "seed": seed, "rank": 4, "model_name": "m", **settings})
        run = tmp_path / folder / label / f"seed_{seed}"
        run.mkdir(parents=True)
        ran = {**history(["federated"], [[0]], [[4]], final), "config": config.to_dict(), "precision": "fp32"}
        ran["rounds"][0]["seconds"] = 60.0
        (run / "training_history.json").write_text(json.dumps(ran))

    finished("a", "fedit", 1, method="fedit")
    finished("a", "fedit_rank=16", 1, method="fedit", rank=16)  # the spec's own setting: allowed
    finished("b", "fedit", 2, method="fedit")
    assert merge([tmp_path / "a", tmp_path / "b"], tmp_path / "out", "fedit", "fedit:rank=16") is None
    assert "| fedit (seeds 1 2) |" in (tmp_path / "out" / "comparison.md").read_text()
    finished("c", "fedit", 3, method="fedit", warmup_rounds=1)  # a setting the merge used to ignore
    refused = merge([tmp_path / "a", tmp_path / "c"], tmp_path / "out", "fedit")
    assert "--warmup_rounds 5 (the run used 1)" in refused
    finished("d", "fedit", 4, method="fedsa_lora")  # another method's run in fedit's folder
    refused = merge([tmp_path / "d"], tmp_path / "out", "fedit")
    assert "not a run of fedit (method fedsa_lora)" in refused
    finished("e", "fedit", 1, method="fedit")  # seed 1 again, in another folder
    refused = merge([tmp_path / "a", tmp_path / "e"], tmp_path / "out", "fedit")
    assert "fedit seed 1 finished twice" in refused


def test_the_comparisons_setting_line_names_the_privacy_the_runs_had():
    from fedlease.report.comparison import participation_text

    assert "DP" not in participation_text(RunConfig())
    assert participation_text(RunConfig(dp_clip=1.0, dp_unit="record", dp_epsilon=6.0, dp_delta=1e-5)) == \
        (", record-level DP (DP-SGD on every client, epsilon per client for one example), clip 1, epsilon 6 at "
         "delta 1e-05")
    assert participation_text(RunConfig(dp_clip=0.5, dp_noise=1.2, sample_rate=0.1)) == \
        (", each client sampled with probability 0.1 a round, client-level DP (DP-FedAvg), clip 0.5, "
         "noise multiplier 1.2")
