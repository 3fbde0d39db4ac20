"""Every script under benchmarks/ runs: each quick mode in a subprocess, on tiny settings, into a temporary folder.

A script that is not run here is listed in ``NOT_RUN`` with the reason, and a new script that is in neither
fails ``test_every_benchmark_is_run_here_or_says_why_not``, so a benchmark cannot rot unnoticed. benchmarks/gpu.py
and benchmarks/open_federation.py have modules of their own (test_benchmark_gpu.py,
test_benchmark_open_federation.py).
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tiny_run_config

BENCHMARKS = REPO / "benchmarks"
RUN_HERE = {"end_to_end.py", "expert_layer.py", "memory.py", "edit_copy_baseline.py", "allocation_table.py",
            "allocation_diagnostics.py", "batch_grouping.py", "decoder_throughput.py", "label_skew_signature.py",
            "merge_comparison.py", "open_federation_label_mix.py", "private_allocation.py", "rss_timeline.py",
            "test_prompt_cut.py", "signature_heldout.py", "round_profile.py", "dp_step_cost.py",
            "peak_batches.py", "dp_utility.py", "device_parity.sh", "compile_training.py"}
ELSEWHERE = {"gpu.py": "tests/test_benchmark_gpu.py", "open_federation.py": "tests/test_benchmark_open_federation.py"}
NOT_RUN = {
    "device_open_comparison.sh": "runs the open-federation comparison on a lent GPU machine (hours of runs)",
    "deployment.py": "starts a real Flower SuperLink and SuperNodes and times them; the deployment itself is tested "
                     "in test_flower.py",
}


def run_script(name: str, *args: str, cwd: Path, timeout: float = 240, ok: bool = True
               ) -> subprocess.CompletedProcess:
    """Run a benchmark script; ``ok``: assert that it succeeded (else that it failed)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(cwd)}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_benchmark_is_run_here_or_says_why_not():
    scripts = {path.name for path in BENCHMARKS.iterdir() if path.suffix in (".py", ".sh")}
    listed = RUN_HERE | set(ELSEWHERE) | set(NOT_RUN)
    assert scripts == listed, {"not listed": sorted(scripts - listed), "gone": sorted(listed - scripts)}
    assert not RUN_HERE & set(NOT_RUN)


def test_end_to_end_measures_throughput_and_splits_every_round(tiny_model, tmp_path):
    result = last_json(run_script("end_to_end.py", "--quick", "--model_name", tiny_model, cwd=tmp_path))
    assert result["benchmark"] == "end_to_end" and result["quick"] is True
    assert set(result["samples_per_s"]) == {"ours", "peft_same_batches", "peft_random_batches"}
    assert all(rate > 0 for rate in result["samples_per_s"].values())
    assert [row["round"] for row in result["round_split"]] == [1, 2]  # a warmup round and an adaptive one
    for row in result["round_split"]:
        assert row["train"] > 0 and row["evaluate"] > 0 and row["total"] >= row["train"]
    assert "cluster" in result["round_split"][0]  # the allocation ends the warmup


def test_expert_layer_times_every_expert_count(tmp_path):
    result = last_json(run_script("expert_layer.py", "--quick", cwd=tmp_path))
    assert result["benchmark"] == "expert_layer" and result["repeats"] == 8
    assert set(result["results"]) == {"m1", "m2", "m4", "m8"}
    assert result["results"]["m1"]["reference_ms"] is None and result["speedup_vs_reference_m4"] > 0
    ops = {m: result["results"][m]["ours_ops"] for m in result["results"]}
    # the mixture costs the same operations for any number of experts (one rank-(M*r) pair, no loop over them),
    # more than plain LoRA (M = 1: exactly LoRA's path); compute operations are a part of all aten calls
    assert ops["m2"] == ops["m4"] == ops["m8"] and ops["m4"]["compute_ops"] > ops["m1"]["compute_ops"]
    assert all(0 < o["compute_ops"] < o["aten_calls"] for o in ops.values())


def test_memory_measures_each_federation_size(tiny_model, tmp_path):
    result = last_json(run_script("memory.py", "--quick", "--model_name", tiny_model, cwd=tmp_path))
    assert result["benchmark"] == "memory" and result["samples_per_client"] == 16
    assert result["peak_rss_mb_16_clients"] > 100 and result["peak_rss_mb_4_clients"] > 100
    assert result["rss_ratio_16_vs_4"] == result["peak_rss_mb_16_clients"] / result["peak_rss_mb_4_clients"]


def test_edit_copy_baseline_scores_every_kind_of_edit(tmp_path):
    report = json.loads(run_script("edit_copy_baseline.py", cwd=tmp_path).stdout)
    assert report["all"]["examples"] == sum(row["examples"] for key, row in report.items() if key != "all")
    assert report["all"]["examples"] > 0


def test_allocation_table_reads_the_committed_diagnostics(tmp_path):
    files = sorted(str(path) for path in (BENCHMARKS / "results" / "allocation").glob("bi_*_s1.json"))
    assert files
    proc = run_script("allocation_table.py", *files, cwd=tmp_path)
    assert "|" in proc.stdout and "ARI" in proc.stdout


def test_allocation_diagnostics_compares_every_signature_each_round(tiny_model, tmp_path):
    out = tmp_path / "diagnostics_s1.json"
    proc = run_script("allocation_diagnostics.py", "--model_name", tiny_model, "--tasks", "rotten_tomatoes:2", "snli:2",
                      "--train_samples", "16", "--batch_size", "8", "--rounds", "1", "--local_epochs", "1",
                      "--max_clusters", "3", "--out", str(out), cwd=tmp_path)
    result = last_json(proc)
    assert result == json.loads(out.read_text())
    assert result["tasks"] == ["rotten_tomatoes"] * 2 + ["snli"] * 2  # two tasks of different label sets
    assert [row["round"] for row in result["rounds"]] == [0, 1]
    assert set(result["rounds"][0]["signatures"]) == {"embed", "embed_centered", "grad0", "grad0_centered"}
    assert set(result["rounds"][1]["signatures"]) == {"b", "b_centered", "ba", "ba_centered", "a_delta", "head"}
    assert set(result["rounds"][1]["train_loss"]) == {"0", "1", "2", "3"}
    for row in result["rounds"]:
        for signature in row["signatures"].values():
            assert len(signature["distances"]) == 4 and all(len(line) == 4 for line in signature["distances"])
            assert set(signature["silhouette"]) == {"2", "3"} and 2 <= signature["chosen_k"] <= 3
            assert len(signature["labels"]) == 4 and len(set(signature["labels"])) == signature["chosen_k"]
            assert -1 <= signature["ari_chosen"] <= 1 and -1 <= signature["ari_true_k"] <= 1
    table = run_script("allocation_table.py", str(out), cwd=tmp_path).stdout  # what reads these files
    assert "| diagnostics | 42 | 1 | b |" in table


def test_batch_grouping_runs_both_batchings_for_each_seed(tiny_model, tmp_path):
    result = last_json(run_script("batch_grouping.py", "--model_name", tiny_model, "--tasks", "rotten_tomatoes:1",
                                  "snli:1", "--seeds", "1", "--train_samples", "48", "--rounds", "2", cwd=tmp_path))
    assert [(run["seed"], run["batches"]) for run in result["runs"]] == [(1, "length-grouped"), (1, "random")]
    for run in result["runs"]:
        assert set(run["tasks"]) == {"rotten_tomatoes", "snli"}
        assert all(0 <= accuracy <= 1 for accuracy in run["tasks"].values()) and 0 <= run["mean"] <= 1
        assert len(run["repeated_batch_pairs"]) == 2 and all(0 <= p <= 1 for p in run["repeated_batch_pairs"])
    grouped, random = (sum(run["repeated_batch_pairs"]) for run in result["runs"])
    assert grouped > random  # length-grouped batches keep their members from one epoch to the next


def test_decoder_throughput_trains_every_variant_on_the_same_tokens(tiny_causal_lm, tmp_path):
    result = last_json(run_script("decoder_throughput.py", "--model_name", tiny_causal_lm, "--samples", "4",
                                  "--batch_size", "2", "--max_length", "96", "--epochs", "1", "--experts", "2",
                                  "--repeats", "1", cwd=tmp_path))
    variants = result["variants"]
    assert set(variants) == {"fedlease_adaptive", "fedlease_warmup", "peft"}
    for name, variant in variants.items():
        assert [run["variant"] for run in variant["runs"]] == [name]
        assert variant["tokens_per_s"] > 0 and variant["peak_memory_mb"] > 0
    assert len({variant["runs"][0]["tokens"] for variant in variants.values()}) == 1
    assert result["fedlease_adaptive_vs_peft"] == (variants["fedlease_adaptive"]["tokens_per_s"]
                                                   / variants["peft"]["tokens_per_s"])


def test_label_skew_signature_clusters_each_signature(tiny_model, tmp_path):
    result = last_json(run_script("label_skew_signature.py", "--model_name", tiny_model, "--tasks",
                                  "rotten_tomatoes:3", "snli:3", "--partition", "dirichlet", "--train_samples", "16",
                                  cwd=tmp_path))
    assert result["tasks"] == ["rotten_tomatoes"] * 3 + ["snli"] * 3
    assert [len(mix) for mix in result["label_mix"]] == [2] * 3 + [3] * 3
    assert all(abs(sum(mix) - 1) < 0.01 for mix in result["label_mix"])
    assert set(result["signatures"]) == {"embed", "class_embed", "default"}
    for signature in result["signatures"].values():
        assert len(signature["labels"]) == 6 and -1 <= signature["ari_vs_tasks"] <= 1
        assert len(set(signature["labels"])) == signature["chosen_k"]
    assert result["signatures"]["default"]["decided_by"] in ("embedding_mean", "embedding")


@pytest.fixture(scope="module")
def compared(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """One comparison run as two `fedlease compare` commands on a small open federation of the tiny model: fedit
    and fedlease with seed 1, fedit with seed 2."""
    from fedlease.compare import compare

    folders = tmp_path_factory.mktemp("compare_seed1"), tmp_path_factory.mktemp("compare_seed2")
    for folder, specs, seed in zip(folders, (["fedit", "fedlease"], ["fedit"]), (1, 2), strict=True):
        config = tiny_run_config(tiny_model, folder, tasks=["rotten_tomatoes:4", "snli:4"], global_rounds=2,
                                 clients_per_round=4, unseen_clients=2, partition="dirichlet", local_epochs=1,
                                 train_samples=16)
        compare(config, specs, [seed], progress=False)
    return folders


def test_merge_comparison_tabulates_the_runs_of_several_folders(compared, tmp_path):
    proc = run_script("merge_comparison.py", *map(str, compared), "--into", str(tmp_path / "merged"), "--methods",
                      "fedit", "fedlease", "ifca", cwd=tmp_path)
    assert "fedit: seeds 1 2" in proc.stdout and "fedlease: seeds 1" in proc.stdout
    assert "ifca: no finished run; left out" in proc.stdout
    rows = [line for line in (tmp_path / "merged" / "comparison.md").read_text().splitlines()
            if line.startswith("| fed")]
    assert any(row.startswith("| fedit (seeds 1 2) |") and "±" in row for row in rows)
    assert any(row.startswith("| fedlease (data signature) (seed 1) |") for row in rows)
    # a run made with other settings is refused, not averaged in
    other = tmp_path / "other"
    shutil.copytree(compared[1] / "fedit", other / "fedit")
    path = other / "fedit" / "seed_2" / "training_history.json"
    history = json.loads(path.read_text())
    history["config"]["lr"] *= 2
    path.write_text(json.dumps(history))
    proc = run_script("merge_comparison.py", str(compared[0]), str(other), "--into", str(tmp_path / "refused"),
                      "--methods", "fedit", cwd=tmp_path, ok=False)
    assert "other settings" in proc.stderr and "lr" in proc.stderr


def test_open_federation_label_mix_describes_every_allocated_client(compared, tmp_path):
    result = last_json(run_script("open_federation_label_mix.py", str(compared[0]), cwd=tmp_path))
    history = json.loads((compared[0] / "fedlease" / "seed_1" / "training_history.json").read_text())
    client_of = {client["client_id"]: client for client in history["clients"]}
    cluster_of = dict(zip(history["clustering"]["clients"], history["clustering"]["labels"], strict=True))
    assert [run["run"] for run in result] == ["fedlease seed 1"]
    clusters = result[0]["clusters"]
    assert set(clusters) == {str(k) for k in history["clustering"]["labels"]}
    described = [c for members in clusters.values() for c in members]
    assert sorted(c["client"] for c in described) == sorted(cluster_of)
    for k, members in clusters.items():
        for c in members:
            assert cluster_of[c["client"]] == int(k)
            assert c["task"] == client_of[c["client"]]["task"]  # the partition recomputed is the run's
            assert 1 / len(client_of[c["client"]]["labels"]) <= c["majority_share"] <= 1


def test_dp_utility_runs_each_epsilon_and_method_and_rederives_its_table(tiny_model, tmp_path):
    out = tmp_path / "utility"
    args = ("dp_utility.py", "--out", str(out), "--epsilons", "inf", "4", "--methods", "fedlease", "fedit",
            "--clip", "0.5", "--", "--model_name", tiny_model, "--tasks", "rotten_tomatoes:3", "snli:3",
            "--sample_rate", "0.5", "--global_rounds", "3", "--warmup_rounds", "1", "--train_samples", "16",
            "--test_samples", "8", "--batch_size", "8", "--max_length", "24", "--local_epochs", "1")
    first = run_script(*args, cwd=tmp_path, timeout=400)
    rows = [json.loads(line) for line in (out / "utility.jsonl").read_text().splitlines()]
    by = {(r["method"].split(" ")[0], r["target_epsilon"]): r for r in rows}
    assert set(by) == {("fedlease", None), ("fedlease", 4), ("fedit", None), ("fedit", 4)}
    for method in ("fedlease", "fedit"):
        plain, private = by[method, None], by[method, 4]
        # the run without DP reports its changes' norms and has no noise; the DP run spends at most its budget
        assert plain["noise_multiplier"] is None and plain["median_change_norm"] > 0 and "head_noise_sd" not in plain
        assert private["noise_multiplier"] > 0 and 0 < private["epsilon_spent"] <= 4 + 1e-6
        assert private["clip"] == 0.5 and private["median_change_norm"] is None and private["clients"] == 6
        # each aggregate's expected contributors: at most the rate times the federation, a head's at most one task's
        assert private["head_contributors"] <= 0.5 * 3 + 1e-9 and private["adapter_contributors"] <= 0.5 * 6 + 1e-9
        assert private["adapter_noise_sd"] == pytest.approx(0.5 * private["noise_multiplier"]
                                                            / private["adapter_contributors"])
        assert private["head_noise_sd"] >= private["adapter_noise_sd"]
        assert private["cohort_for_noise_at_most_signal"] == math.ceil(
            private["noise_multiplier"] * math.sqrt(private["upload_params"]))
        assert private["upload_params"] > 0
        history = json.loads(Path(private["run"], "training_history.json").read_text())
        assert history["config"]["dp_epsilon"] == 4 and history["config"]["sample_rate"] == 0.5
    assert by["fedlease", None]["method"] == "fedlease (data signature)"
    # FedLEASE's allocation (its signature and warmup uploads) spends part of the budget; FedIT has none
    assert 0 < by["fedlease", 4]["allocation_epsilon"] < by["fedlease", 4]["epsilon_spent"]
    assert by["fedit", 4]["allocation_epsilon"] is None
    assert by["fedit", 4]["adapter_contributors"] == pytest.approx(3.0)  # one shared adapter: 0.5 x 6
    assert by["fedit", 4]["head_contributors"] == pytest.approx(1.5)  # a head per task: 0.5 x 3
    assert by["fedit", None]["upload_params"] == by["fedit", 4]["upload_params"]  # DP sends the same arrays
    # everything has run: a second call trains nothing, and the table is re-derived from the histories alone
    again = run_script(*args, cwd=tmp_path)
    assert "compare" not in again.stdout.split("| method |")[0]
    table = run_script("dp_utility.py", "--out", str(out), "--table-only", cwd=tmp_path).stdout
    assert table.strip() == (out / "utility.md").read_text().strip() and table.strip() in first.stdout
    runs, over_seeds = table.split("Over seeds:")
    over_seeds, tasks = over_seeds.split("Per task, over seeds:")
    assert runs.count("\n| fed") == 4 and over_seeds.count("\n| fed") == 4 and tasks.count("\n| fed") == 4
    # each task's column is the histories' final accuracy of that task; a uniform guess is 1 / its labels
    assert "| method | epsilon | seeds | rotten_tomatoes | snli |" in tasks
    assert "| uniform guess | | | 50.00 | 33.33 |" in tasks
    final = json.loads(Path(by["fedit", 4]["run"], "training_history.json").read_text())["final"]["tasks"]
    assert (f"| fedit | 4 | 1 | {100 * final['rotten_tomatoes']['accuracy']:.2f} | "
            f"{100 * final['snli']['accuracy']:.2f} |") in tasks
    # a committed history is gzipped: the table is the same
    for path in out.glob("runs/eps*/*/*/seed_*/training_history.json"):
        path.with_suffix(".json.gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    assert run_script("dp_utility.py", "--out", str(out), "--table-only", cwd=tmp_path).stdout == table


def test_dp_utility_record_unit_runs_dp_sgd_and_sums_up_each_epsilon_over_seeds(tiny_model, tmp_path):
    out = tmp_path / "record"
    run_script("dp_utility.py", "--out", str(out), "--unit", "record", "--epsilons", "inf", "4", "--methods",
               "ffa_lora", "--seeds", "1", "2", "--clip", "1.0", "--", "--model_name", tiny_model, "--tasks",
               "rotten_tomatoes:2", "snli:2", "--global_rounds", "2", "--warmup_rounds", "1", "--train_samples",
               "12", "--test_samples", "8", "--batch_size", "4", "--max_length", "24", "--local_epochs", "1",
               cwd=tmp_path, timeout=400)
    rows = [json.loads(line) for line in (out / "utility.jsonl").read_text().splitlines()]
    by = {(r["method"], r["target_epsilon"], r["seed"]): r for r in rows}
    assert set(by) == {("ffa_lora", e, s) for e in (None, 4) for s in (1, 2)}
    for (_, target, _), r in by.items():
        history = json.loads(Path(r["run"], "training_history.json").read_text())
        if target is None:
            assert r["unit"] == "-" and r["noise_multiplier"] is None and "privacy" not in history
            continue
        # DP-SGD on every client, each with its own noise multiplier; the row gives their range and the largest
        # epsilon a client spent, and no server-side aggregate figures
        clients = history["privacy"]["clients"]
        assert r["unit"] == "record" and history["config"]["dp_unit"] == "record" and len(clients) == 4
        assert r["noise_multiplier"] == max(c["noise_multiplier"] for c in clients.values())
        assert r["noise_multiplier_min"] == min(c["noise_multiplier"] for c in clients.values()) > 0
        assert r["epsilon_spent"] == pytest.approx(max(c["epsilon"] for c in clients.values()))
        assert 0 < r["epsilon_spent"] <= 4 + 1e-6 and "adapter_contributors" not in r
    # the summary: mean and sd over the seeds, and the change from the same seed's run without DP
    summary = (out / "utility.md").read_text().split("Over seeds:")[1]
    for method in ("ffa_lora",):
        plain = [100 * by[method, None, s]["accuracy"] for s in (1, 2)]
        private = [100 * by[method, 4, s]["accuracy"] for s in (1, 2)]
        change = [p - q for p, q in zip(private, plain, strict=True)]
        line = next(x for x in summary.splitlines() if x.startswith(f"| {method} | 4 |"))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[2] == "1 2"
        assert cells[3] == f"{statistics.mean(private):.2f} ± {statistics.stdev(private):.2f}"
        assert cells[4] == f"{statistics.mean(change):.2f} ± {statistics.stdev(change):.2f}"
        assert f"| {method} | inf (no DP) | 1 2 | {statistics.mean(plain):.2f} ± {statistics.stdev(plain):.2f} | - |" \
            in summary


def test_private_allocation_runs_each_epsilon_and_rederives_its_table(tiny_model, tmp_path):
    out = tmp_path / "private"
    run_script("private_allocation.py", "--out", str(out), "--epsilons", "inf", "4", "--allocations", "embedding",
               "--warmup_rounds", "1", "--", "--model_name", tiny_model, "--tasks", "rotten_tomatoes:2", "snli:2",
               "--train_samples", "16", "--test_samples", "8", "--batch_size", "8", "--max_length", "24",
               cwd=tmp_path)
    rows = {row["run"]: row for row in map(json.loads, (out / "ari.jsonl").read_text().splitlines())}
    assert set(rows) == {"embedding_epsinf_s1", "embedding_eps4_s1"}
    plain, private = rows["embedding_epsinf_s1"], rows["embedding_eps4_s1"]
    assert plain["target_epsilon"] is None and plain["noise_multiplier"] is None
    assert private["target_epsilon"] == 4 and private["noise_multiplier"] > 0
    assert 0 < private["epsilon_spent"] <= 4 + 1e-6
    for row in rows.values():
        assert row["allocation"] == "embedding" and row["K"] >= 1 and -1 <= row["ari"] <= 1
    # record-level DP: a run of its own beside the client-level one, its noise the largest client's
    run_script("private_allocation.py", "--out", str(out), "--epsilons", "inf", "4", "--allocations", "embedding",
               "--unit", "record", "--warmup_rounds", "1", "--", "--model_name", tiny_model, "--tasks",
               "rotten_tomatoes:2", "snli:2", "--train_samples", "16", "--test_samples", "8", "--batch_size", "8",
               "--max_length", "24", cwd=tmp_path)
    rows = {row["run"]: row for row in map(json.loads, (out / "ari.jsonl").read_text().splitlines())}
    assert set(rows) == {"embedding_epsinf_s1", "embedding_eps4_s1", "embedding_record_eps4_s1"}
    record = rows["embedding_record_eps4_s1"]
    history = json.loads((out / "runs" / "embedding_record_eps4_s1" / "training_history.json").read_text())
    assert record["unit"] == "record" and rows["embedding_eps4_s1"]["unit"] == "client" and plain["unit"] == "-"
    assert record["noise_multiplier"] == max(c["noise_multiplier"] for c in history["privacy"]["clients"].values())
    assert 0 < record["epsilon_spent"] <= 4 + 1e-6
    table = (out / "ari.md").read_text()
    assert [line.split(" | ")[1] for line in table.splitlines() if line.startswith("| embedding |")] == \
        ["-", "client", "record"]
    (out / "ari.md").unlink()
    run_script("private_allocation.py", "--out", str(out), "--table-only", cwd=tmp_path)
    assert (out / "ari.md").read_text() == table


def test_rss_timeline_samples_a_whole_run(tiny_model, tmp_path):
    out, run_dir = tmp_path / "rss.json", tmp_path / "run"
    args = ["run", "--model_name", tiny_model, "--tasks", "rotten_tomatoes:2", "snli:2", "--global_rounds", "2",
            "--warmup_rounds", "1", "--train_samples", "16", "--test_samples", "8", "--batch_size", "8",
            "--max_length", "24", "--output_dir", str(run_dir), "--no_progress"]
    run_script("rss_timeline.py", str(out), *args, cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["args"] == args and (run_dir / "training_history.json").exists()
    times = [t for t, _ in result["samples"]]
    assert times == sorted(times) and result["peak_mib"] == max(rss for _, rss in result["samples"]) > 0
    assert len(result["round_ends"]) == 2 and 0 < result["round_ends"][0] <= result["round_ends"][1]
    assert all(to - start > 20 for _, start, to in result["jumps"])
    assert all(s["to_mib"] - s["from_mib"] > 15 and s["stack"] for s in result["stacks"])


def test_peak_batches_records_every_training_batch_and_the_peaks_rises(tiny_model, tmp_path):
    out = tmp_path / "peaks.json"
    args = ["run", "--model_name", tiny_model, "--tasks", "rotten_tomatoes:2", "snli:2", "--global_rounds", "2",
            "--warmup_rounds", "1", "--train_samples", "16", "--test_samples", "8", "--batch_size", "8",
            "--local_epochs", "1", "--max_length", "24", "--output_dir", str(tmp_path / "run"), "--no_progress"]
    summary = last_json(run_script("peak_batches.py", "--step_mib", "0", str(out), *args, cwd=tmp_path))
    result = json.loads(out.read_text())
    assert result["command"] == ["fedlease", *args] and summary["final_peak_mib"] == result["final_peak_mib"]
    # 4 clients x 2 rounds x 2 batches of 8, each recorded once with its shape
    assert sum(s["batches"] for s in result["shapes"]) == 16
    assert {s["task"] for s in result["shapes"]} == {"rotten_tomatoes", "snli"}
    assert all(s["tokens"] == s["rows"] * s["width"] and s["width"] <= 24 for s in result["shapes"])
    assert result["largest_batch"]["tokens"] == max(s["tokens"] for s in result["shapes"])
    rises = result["rises"]
    assert rises and all(r["to_mib"] > r["from_mib"] for r in rises)
    assert all(a["to_mib"] <= b["from_mib"] for a, b in itertools.pairwise(rises))  # the peak never falls
    assert rises[-1]["to_mib"] <= result["final_peak_mib"]


def test_test_prompt_cut_counts_every_test_prompt(tiny_causal_lm, tmp_path):
    proc = run_script("test_prompt_cut.py", "--model_name", tiny_causal_lm, "--tasks", "instruct_edit:2",
                      "instruct_commonsense:1", "--max_length", "384", "--train_samples", "8", "--test_samples", "4",
                      cwd=tmp_path)
    result = json.loads(proc.stdout)
    assert result["max_length"] == 384 and result["test_samples"] == 4
    counts = result["tasks"]
    assert {task: c["test_prompts"] for task, c in counts.items()} == {"instruct_edit": 8, "instruct_commonsense": 4}
    for c in counts.values():  # the room a client's answers leave is at most half: it cuts no more prompts
        assert 0 <= c["cut_now"] <= c["cut_at_half_the_room"] <= c["test_prompts"]


def test_signature_heldout_runs_a_setting_resumes_and_tabulates(tiny_model, tmp_path):
    out = tmp_path / "heldout.jsonl"
    args = ("signature_heldout.py", str(out), "--only", "builtin_three_64", "--model_name", tiny_model)
    first = run_script(*args, cwd=tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["setting"], r["seed"]) for r in rows] == [("builtin_three_64", s) for s in (11, 12, 13)]
    for row in rows:
        assert row["tasks"] == ["newsgroups"] * 3 + ["election_tweets"] * 3 + ["snli"] * 3
        assert row["train_samples"] == 64 and set(row["signatures"]) == {"embed", "class_embed", "default"}
    run_script(*args, cwd=tmp_path)  # every seed is there: nothing runs again
    assert out.read_text().splitlines() == [json.dumps(r) for r in rows]
    table = run_script("signature_heldout.py", str(out), "--table-only", cwd=tmp_path).stdout
    line = next(x for x in table.splitlines() if x.startswith("| builtin_three_64 "))
    right = sum(r["signatures"]["default"]["ari_vs_tasks"] == 1.0 for r in rows)
    assert f"| {right} of 3 |" in line and f"{right} of 3 runs." in table
    assert line in first.stdout


def test_round_profile_splits_the_adaptive_rounds_cpu_time_by_function(tiny_model, tmp_path):
    result = last_json(run_script("round_profile.py", "--quick", "--top", "1000", "--model_name", tiny_model,
                                  cwd=tmp_path, timeout=400))
    assert result["benchmark"] == "round_profile" and result["profiled_rounds"] == [3, 4]
    for size in ("8", "40"):
        entry = result["sizes"][size]
        assert sorted(entry["cpu_seconds_by_round"], key=int) == ["1", "2", "3", "4"]  # stopped before the last
        profiled = [entry["cpu_seconds_by_round"][r] for r in ("3", "4")]
        assert entry["cpu_seconds_per_profiled_round"] == pytest.approx(sum(profiled) / 2, abs=2e-3)
        # the profiled rounds train clients, and a function's CPU time is within its round's
        fit = entry["functions"]["train.py:fit"]
        assert fit["calls"] >= 2 and 0 < fit["cpu_seconds"] <= sum(profiled) + 1e-6
    # at 40 clients most of the sampled clients are new and compute their data signature in these rounds
    assert result["sizes"]["40"]["functions"]["methods/fedlease.py:data_signature"]["calls"] > \
        result["sizes"]["8"]["functions"].get("methods/fedlease.py:data_signature", {"calls": 0})["calls"]


def test_dp_step_cost_times_dp_sgd_against_the_same_training_without_it(tiny_model, tmp_path):
    result = last_json(run_script("dp_step_cost.py", "--quick", "--model_name", tiny_model, cwd=tmp_path))
    assert result["benchmark"] == "dp_step_cost" and result["quick"] is True
    (row,) = result["rows"]
    grads, call = row["gradients"], row["local_call"]
    assert row["batch_size"] == 8 and grads["examples"] == 16 and grads["batches"] == 2
    assert grads["ratio"] == pytest.approx(grads["micro_batched_cpu_s"] / grads["batched_cpu_s"], rel=0.01)
    assert grads["one_pass_ratio"] == pytest.approx(grads["one_pass_cpu_s"] / grads["batched_cpu_s"], rel=0.01)
    # a DP call takes as many steps as a plain one, at q = batch / examples
    assert call["steps"] == call["dp_steps"] == 2 and call["poisson_rate"] == 0.5
    assert call["ratio"] == pytest.approx(call["dp_cpu_s_per_step"] / call["plain_cpu_s_per_step"], rel=0.01)


def test_device_parity_runs_every_variant_and_seed_and_merge_comparison_tables_them(tiny_model, tmp_path):
    """benchmarks/device_parity.sh with the CPU standing in for the GPU and a tiny setting: one process per
    (variant, seed), all packed into runs.tar.gz; merge_comparison.py tables the variants as method specs."""
    import tarfile

    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "WORK": str(work), "GPU": "cpu", "MODEL": tiny_model, "SETTINGS": "quick",
           "SEEDS": "1 2", "POLL": "1", "CPU_THREADS": "1", "PYTHON": sys.executable, "TMPDIR": str(tmp_path),
           "QUICK_SIZE": "--tasks rotten_tomatoes:2 snli:2 --global_rounds 2 --warmup_rounds 1 --train_samples 16 "
                         "--test_samples 8 --batch_size 8 --max_length 24"}
    proc = subprocess.run(["bash", str(BENCHMARKS / "device_parity.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "still running: 0" in (out / "device.txt").read_text()
    back = tmp_path / "back"
    with tarfile.open(out / "runs.tar.gz") as tar:
        tar.extractall(back, filter="data")
    histories = sorted(p.relative_to(back).parts[:2] for p in back.glob("quick/*/*/seed_*/training_history.json"))
    assert histories == [("quick", f"cpu_{p}_seed{s}") for p in ("bf16", "fp32") for s in (1, 2)]
    specs = [f"fedlease:device=cpu,precision={p},model_name={tiny_model}" for p in ("fp32", "bf16")]
    proc = run_script("merge_comparison.py", *map(str, sorted(back.glob("quick/*"))), "--into", str(tmp_path / "t"),
                      "--methods", *specs, cwd=tmp_path)
    table = (tmp_path / "t" / "comparison.md").read_text()
    for precision in ("fp32", "bf16"):
        accuracies = [json.loads(p.read_text())["final"]["mean"]["accuracy"]
                      for p in back.glob(f"quick/cpu_{precision}_seed*/*/seed_*/training_history.json")]
        assert len(accuracies) == 2
        row = next(line for line in table.splitlines() if f"precision={precision}" in line)
        assert f"{100 * statistics.mean(accuracies):.2f} ± {100 * statistics.stdev(accuracies):.2f}" in row, row


def test_compile_training_compiles_one_graph_per_layout_and_trains_as_eager(tmp_path):
    """The quick run compiles with the eager backend (dynamo's graphs and guards, no generated code; AOTAutograd
    through the expert layer is tested in test_experts): the compiled model must train every client as eager does,
    and make no graph per own expert (4 clients, each its own expert of K = 4: a graph each would be 4 adaptive
    graphs)."""
    result = last_json(run_script("compile_training.py", "--quick", cwd=tmp_path))
    assert result["benchmark"] == "compile_training" and result["backend"] == "eager"
    assert result["compiled"]["graph_breaks"] == 0
    assert 1 <= result["compiled"]["graphs"] <= 3  # warmup: one, and one with dynamic shapes; adaptive: one
    eager, compiled = result["rounds"]["eager"], result["rounds"]["compiled"]
    assert [(r["layout"], r["round"]) for r in eager] == [(r["layout"], r["round"]) for r in compiled]
    assert len({f["loss"] for r in eager for f in r["fits"]}) > 4  # the clients and layouts differ
    for ours, reference in zip(compiled, eager, strict=True):
        assert [f["steps"] for f in ours["fits"]] == [f["steps"] for f in reference["fits"]]
        assert [f["loss"] for f in ours["fits"]] == pytest.approx([f["loss"] for f in reference["fits"]], rel=1e-5)
    eager_calls = result["eager"]["aten_calls_per_adaptive_step"]
    assert 0 < result["eager"]["batch_making_aten_calls_per_adaptive_step"] < eager_calls
