"""results.md counts the clients each mean covers, and says so when no evaluation arrived."""

from __future__ import annotations

from fedlease.config import RunConfig
from fedlease.methods.base import ClientInfo, RoundReport
from fedlease.report.artifacts import RunRecorder

TASKS = ["x", "x", "x", "y", "y", "y"]  # clients 2 and 5 are held out of training (newcomers)


def results_after(tmp_path, last_round: dict[int, float]) -> str:
    """results.md of a two-round run whose first round evaluated every client that trained and whose last round
    evaluated only the clients in ``last_round`` (client -> accuracy)."""
    clients = [ClientInfo(cid, task, ("a", "b")) for cid, task in enumerate(TASKS)]
    recorder = RunRecorder(tmp_path, RunConfig(tasks=TASKS, global_rounds=2, warmup_rounds=1), clients, {},
                           unseen=[2, 5])
    recorder.record_round(0, RoundReport("warmup"), {}, {}, {cid: {"accuracy": 0.5} for cid in (0, 1, 3, 4)}, {}, 1.0)
    recorder.record_round(1, RoundReport("adaptive"), {}, {}, {c: {"accuracy": a} for c, a in last_round.items()},
                          {}, 1.0)
    recorder.finish()
    return (tmp_path / "results.md").read_text()


def test_each_row_counts_the_clients_whose_evaluation_arrived(tmp_path):
    table = results_after(tmp_path, {0: 0.6, 2: 0.9})
    assert "| x | 1 | 60.00 |" in table  # one of x's two training clients answered: one counted, not two
    assert "| y |" not in table.split("Newcomers")[0]  # no y client answered
    assert "| mean over tasks | 1 | 60.00 |" in table
    assert "| x | 1 | 90.00 |" in table.split("Newcomers")[1]


def test_newcomers_are_reported_when_no_trained_clients_evaluation_arrived(tmp_path):
    table = results_after(tmp_path, {5: 0.7})
    assert "No client's evaluation arrived (clients that trained): no result." in table
    assert "| y | 1 | 70.00 |" in table.split("Newcomers")[1]


def test_a_run_whose_last_round_evaluated_nobody_says_so(tmp_path):
    assert results_after(tmp_path, {}).strip() == "No client's evaluation arrived: no result."
