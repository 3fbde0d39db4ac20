"""Bad input ends with one line on stderr and exit status 2, before any training starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedlease.cli import main

FAST = ["--global_rounds", "2", "--warmup_rounds", "1", "--train_samples", "8", "--test_samples", "4",
        "--no_progress"]


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("fedlease: error: "), err
    assert fragment in lines[-1], lines[-1]
    assert "Traceback" not in err


@pytest.mark.parametrize("args,fragment", [
    (["--tasks", "sst3"], "unknown task 'sst3'"),
    (["--tasks"], "expected at least one argument"),
    (["--tasks", "snli:0"], "positive integer"),
    (["--method", "fedsgd"], "unknown method 'fedsgd'"),
    (["--warmup_rounds", "2", "--global_rounds", "2"], "--warmup_rounds (2) must be smaller"),
    (["--warmup_rounds", "0"], "--warmup_rounds must be at least 1"),
    (["--global_rounds", "0"], "--global_rounds must be at least 1"),
    (["--local_epochs", "-1"], "--local_epochs must be at least 1"),
    (["--rank", "0"], "--rank must be at least 1"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--train_samples", "0"], "--train_samples: must be at least 1 or all, got 0"),
    (["--test_samples", "-5"], "--test_samples: must be at least 1 or all, got -5"),
    (["--train_samples", "some"], "--train_samples: invalid Samples value: 'some'"),
    (["--max_clusters", "0"], "--max_clusters must be at least 1"),
    (["--lr", "fast"], "invalid float value: 'fast'"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--device", "cpu", "--precision", "fp16"], "--precision fp16 needs CUDA"),
    (["--partition", "dirichlet", "--alpha", "-1"], "--alpha must be a positive number"),
    (["--allocation", "b_cosine"], "invalid choice: 'b_cosine'"),
    (["--min_silhouette", "1.5"], "--min_silhouette must be in [-1, 1]"),
    (["--pair_encoding", "cross"], "invalid choice: 'cross'"),
    (["--unknown_flag"], "unrecognized arguments: --unknown_flag"),
    # a setting the run would not use, refused rather than ignored under a name that says it was used
    (["--method", "fedit", "--top_k", "2"], "--top_k 2 does not apply to this run: only --method fedlease uses it"),
    (["--num_clusters", "3"], "--num_clusters 3 does not apply to this run: only --method ifca uses it"),
    (["--method", "ifca", "--max_clusters", "2"], "--max_clusters 2 does not apply to this run: only --method "
                                                  "fedlease"),
    (["--allocation", "paper", "--min_silhouette", "0.3"],
     "--min_silhouette 0.3 does not apply to this run: only --allocation embedding uses it"),
    (["--update_norm_action", "clip"], "--update_norm_action clip does not apply to this run"),
    (["--alpha", "nan"], "--alpha nan does not apply to this run: only --partition dirichlet uses it"),
    (["--alpha", "0.1"], "--alpha 0.1 does not apply to this run: only --partition dirichlet uses it"),
    (["--quantization", "8bit"], "--quantization 8bit does not apply to this run: it stores the decoder"),
    (["--generation_cache", "static"], "--generation_cache static does not apply to this run: it is the generation "
                                       "cache of instruction tasks"),
])
def test_bad_flags(capsys, tmp_path, args, fragment):
    # FAST first, so that the case's own flags win and a case that is wrongly accepted fails in seconds
    code, err = run_cli(capsys, "run", "--output_dir", str(tmp_path / "out"), *FAST, *args)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists(), "a refused run must not leave an output directory"


def test_bad_model_folders(capsys, tmp_path):
    code, err = run_cli(capsys, "run", "--tasks", "snli", "--model_name", str(tmp_path / "missing"),
                        "--output_dir", str(tmp_path / "a"), *FAST)
    assert_one_line_error(code, err, "no such model folder")
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, "run", "--tasks", "snli", "--model_name", str(tmp_path / "empty"),
                        "--output_dir", str(tmp_path / "b"), *FAST)
    assert_one_line_error(code, err, "has no config.json")


def test_hub_model_offline_names_the_alternatives(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from fedlease import hub

    hub.hub_reachable.cache_clear()
    code, err = run_cli(capsys, "run", "--tasks", "snli", "--model_name", "roberta-large",
                        "--output_dir", str(tmp_path / "o"), *FAST)
    assert_one_line_error(code, err, "hub cannot be reached")
    assert "all-MiniLM-L6-v2" in err and "local folder" in err


def test_glue_task_without_data_names_data_dir(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from fedlease import hub

    hub.hub_reachable.cache_clear()
    code, err = run_cli(capsys, "run", "--tasks", "sst2", "qnli", "--output_dir", str(tmp_path / "o"), *FAST)
    assert_one_line_error(code, err, "--data_dir")


def test_too_many_samples_without_overlap(capsys, tmp_path, glue_dir):
    code, err = run_cli(capsys, "run", "--tasks", "mrpc:4", "--data_dir", str(glue_dir), "--train_samples",
                        "1000", "--output_dir", str(tmp_path / "o"), *FAST[:4])
    assert_one_line_error(code, err, "--allow_overlap")


def test_output_dir_holding_a_run_is_refused(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "training_history.json").write_text("{}")
    code, err = run_cli(capsys, "run", "--output_dir", str(out), *FAST)
    assert_one_line_error(code, err, "already holds a run; pass --resume")
    assert "--overwrite to replace it" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli(capsys, "run", "--output_dir", str(blocker), *FAST)
    assert_one_line_error(code, err, "is not a directory")


def test_entry_point_prints_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedlease", "run", "--tasks", "nope", "--output_dir",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("fedlease: error: unknown task 'nope'; known tasks: rotten_tomatoes snli "
                                   "newsgroups election_tweets sst2 qnli mrpc qqp rte mnli instruct_sentiment "
                                   "instruct_nli instruct_edit instruct_struct2text instruct_commonsense")


def test_tasks_listing(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "rotten_tomatoes" in out and "mnli" in out


def test_bad_data_dirs(capsys, tmp_path):
    common = ["--output_dir", str(tmp_path / "o"), *FAST]
    code, err = run_cli(capsys, "run", "--tasks", "sst2", "--data_dir", str(tmp_path / "none"), *common)
    assert_one_line_error(code, err, "is not a directory")
    (tmp_path / "glue").mkdir()
    code, err = run_cli(capsys, "run", "--tasks", "sst2", "--data_dir", str(tmp_path / "glue"), *common)
    assert_one_line_error(code, err, "has no SST-2/ folder")
    (tmp_path / "glue" / "SST-2").mkdir()
    (tmp_path / "glue" / "SST-2" / "train.tsv").write_text("sentence\tlabel\nfine\t1\nbroken row\n")
    (tmp_path / "glue" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    code, err = run_cli(capsys, "run", "--tasks", "sst2", "--data_dir", str(tmp_path / "glue"), *common)
    assert_one_line_error(code, err, "SST-2/train.tsv:3: expected 2 tab-separated fields, found 1")
    (tmp_path / "glue" / "SST-2" / "train.tsv").write_text("sentence\tlabel\nfine\t1\nalso fine\t1\n")
    code, err = run_cli(capsys, "run", "--tasks", "sst2", "--data_dir", str(tmp_path / "glue"), *common)
    assert_one_line_error(code, err, "no example of class 'negative'")  # the label set does not fit the data
    assert not (tmp_path / "o").exists()


def test_unwritable_output_dir(capsys, tmp_path, tiny_model):
    code, err = run_cli(capsys, "run", "--tasks", "snli", "--model_name", tiny_model, "--output_dir",
                        "/dev/null/run", *FAST)
    assert_one_line_error(code, err, "is not writable")


def test_resume_flag_conflicts(capsys, tmp_path):
    code, err = run_cli(capsys, "run", "--resume", str(tmp_path), "--output_dir", str(tmp_path / "other"))
    assert_one_line_error(code, err, "do not pass a different --output_dir")
    code, err = run_cli(capsys, "run", "--resume", str(tmp_path), "--overwrite")
    assert_one_line_error(code, err, "pass one of them")


@pytest.mark.parametrize(("name", "value"), [("generation_cache", "Static"), ("precision", "fp8"),
                                             ("allocation", "kmeans")])
def test_a_setting_outside_its_choices_is_refused_where_argparse_does_not_look(name, value):
    """A Flower run-config or a method spec (`fedlease:allocation=...`) builds a RunConfig without argparse."""
    from fedlease.config import RunConfig
    from fedlease.errors import ConfigError

    with pytest.raises(ConfigError, match=f"--{name} must be one of .*got {value!r}"):
        RunConfig(**{name: value}).validate()
