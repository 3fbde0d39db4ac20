"""Kill a run with SIGKILL at many points, resume it, and get exactly what an uninterrupted run gets."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlease.cli import main
from fedlease.runtime.checkpoint import FOLDER, MANIFEST

HARNESS = Path(__file__).with_name("kill_harness.py")


SAMPLED = "fedlease-sampled"  # FedLEASE in an open federation: 2 of 4 clients a round, 2 newcomers held out


def args_for(model: str, out: Path, method: str = "fedlease") -> list[str]:
    tasks = ["rotten_tomatoes:3", "snli:3", "--clients_per_round", "2", "--unseen_clients", "2"] \
        if method == SAMPLED else ["rotten_tomatoes:2", "snli:2"]
    return ["run", "--model_name", model, "--method", method.removesuffix("-sampled"), "--tasks", *tasks,
            "--global_rounds", "4", "--warmup_rounds", "2", "--train_samples", "24", "--test_samples", "12",
            "--batch_size", "8", "--max_length", "24", "--lr", "0.01", "--seed", "11", "--output_dir", str(out),
            "--no_progress"]


def outcome(out: Path) -> tuple[dict, dict]:
    history = json.loads((out / "training_history.json").read_text())
    metrics = {key: history[key] for key in ("client_scores", "optimal_n_clusters", "lora_client_map", "final")}
    metrics["clustering"] = history["clustering"] and history["clustering"]["labels"]
    metrics["rounds"] = [(r["round"], r["phase"], r["tasks"], r["mean"]) for r in history["rounds"]]
    weights = {path.name: load_file(str(path)) for path in sorted((out / "final").glob("*.safetensors"))}
    return metrics, weights


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Each method's run of ``args_for``, uninterrupted: its output folder (tests copy it before changing it)."""
    runs = {}
    for method in ("fedlease", "feddpa", SAMPLED):
        runs[method] = tmp_path_factory.mktemp(f"reference-{method}") / "run"
        assert main(args_for(tiny_model, runs[method], method)) == 0
    return runs


@pytest.fixture(scope="module")
def reference(uninterrupted):
    return {method: outcome(out) for method, out in uninterrupted.items()}


KILL_POINTS = [
    ("fedlease", "fit:6"),  # during warmup, round 2
    ("fedlease", "after-clustering"),  # clustering done, round 2 not yet recorded or checkpointed
    ("fedlease", "fit:11"),  # during adaptive training, round 3
    ("fedlease", "checkpoint-write:3"),  # round 2's tensor file written but not renamed
    ("fedlease", "checkpoint-write:6"),  # round 3's manifest written but not renamed
    ("fedlease", "round:4"),  # the last round recorded and its final weights about to be saved
    ("feddpa", "fit:10"),  # FedDPA keeps a local adapter in each client's store: it must survive
    (SAMPLED, "fit:6"),  # round 3, after the allocation: a client absent so far is placed and trains
    (SAMPLED, "round:4"),  # the newcomers evaluated, the final weights about to be saved
]


@pytest.mark.parametrize("method,point", KILL_POINTS)
def test_killed_run_resumes_to_identical_results(tiny_model, tmp_path, reference, method, point):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(HARNESS), point, *args_for(tiny_model, out, method)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "training_log.txt").exists()
    assert main(["run", "--resume", str(out), "--no_progress"]) == 0
    metrics, weights = outcome(out)
    ref_metrics, ref_weights = reference[method]
    assert metrics == ref_metrics
    assert weights.keys() == ref_weights.keys() and len(weights) == (6 if method == SAMPLED else 4)
    for name, tensors in weights.items():
        assert tensors.keys() == ref_weights[name].keys()
        for key, value in tensors.items():
            assert torch.equal(value, ref_weights[name][key]), (name, key)
    assert "resuming" in (out / "training_log.txt").read_text()
    [resumed] = json.loads((out / "training_history.json").read_text())["resumed"]  # where the session ran
    assert resumed["device"] == "cpu" and 1 <= resumed["after_round"] <= 4


@pytest.fixture
def finished(uninterrupted, tmp_path):
    """A finished FedLEASE run of its own (a copy: the run's paths are the folder's, not recorded in it)."""
    return Path(shutil.copytree(uninterrupted["fedlease"], tmp_path / "run"))


def test_resume_refuses_a_different_configuration(capsys, finished):
    capsys.readouterr()
    code = main(["run", "--resume", str(finished), "--lr", "0.5", "--seed", "3", "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "--lr 0.5 (the run used 0.01)" in err and "--seed 3 (the run used 11)" in err
    # flags that do not change what is computed may differ
    assert main(["run", "--resume", str(finished), "--eval_batch_size", "7", "--no_progress"]) == 0


@pytest.mark.parametrize("damage", ["truncate-tensors", "alter-tensors", "alter-manifest", "truncate-manifest",
                                    "delete-tensors"])
def test_damaged_checkpoint_is_refused_whole(capsys, finished, damage):
    folder = finished / FOLDER
    tensors = next(folder.glob("state-*.safetensors"))
    manifest = folder / MANIFEST
    if damage == "truncate-tensors":
        tensors.write_bytes(tensors.read_bytes()[:-100])
    elif damage == "alter-tensors":
        payload = bytearray(tensors.read_bytes())
        payload[-5] ^= 0x01
        tensors.write_bytes(bytes(payload))
    elif damage == "alter-manifest":
        manifest.write_text(manifest.read_text().replace('"round": 3', '"round": 1'))
    elif damage == "truncate-manifest":
        manifest.write_text(manifest.read_text()[:200])
    else:
        tensors.unlink()
    before = (finished / "training_history.json").read_text()
    capsys.readouterr()
    code = main(["run", "--resume", str(finished), "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("fedlease: error: ") and "\n" not in err
    assert "refusing to resume" in err
    assert (finished / "training_history.json").read_text() == before  # nothing was touched


def test_resume_without_checkpoint(capsys, tmp_path):
    code = main(["run", "--resume", str(tmp_path), "--no_progress"])
    assert code == 2 and "has no checkpoint to resume from" in capsys.readouterr().err


def test_nothing_is_unpickled():
    """Checkpoints and exchanged weights are safetensors/JSON: no pickle-based loader anywhere in the package."""
    source = Path(__file__).resolve().parents[1] / "src" / "fedlease"
    offenders = [str(p) for p in source.rglob("*.py")
                 if any(word in p.read_text() for word in ("torch.load(", "import pickle", "pickle.load"))]
    assert offenders == []
