"""Which training batches set a run's peak memory: ``fedlease run`` in this process, every local training batch
recorded with the process's peak RSS.

    python benchmarks/peak_batches.py [--step_mib 8] OUT.json run --tasks ... (any fedlease run arguments)

Every call of ``LocalClient.batch_loss`` (the forward pass of a training batch; its backward follows) is recorded
with its task, its shape (rows x width; a separately encoded pair has two rows per example) and tokens (rows x
width), and the kernel's peak RSS (``VmHWM``) just before it. The peak only grows, and it grows during a training
step by that step's activations, so each rise of more than ``--step_mib`` between two batches is attributed to
the batch trained in between. Writes OUT.json: the rises, the largest batch by tokens, how many batches each
shape had, and the final peak; prints a one-line summary of it as JSON as the last line of stdout.

Used to explain why the scale benchmark's 1,000-client run peaks higher than its 20-client run (issue 33): the
peak follows the largest batch any sampled client trained, and more distinct clients train at 1,000.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from fedlease import train as T
from fedlease.cli import main as fedlease_main


def peak_mib() -> int:
    """The process's peak resident set size so far (Linux: VmHWM in /proc/self/status, kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) >> 10
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


class BatchRecorder:
    """Wraps ``LocalClient.batch_loss``: each batch's shape, and the peak RSS between consecutive batches."""

    def __init__(self, step_mib: int) -> None:
        self.step_mib = step_mib
        self.shapes: Counter[tuple[str, int, int]] = Counter()
        self.rises: list[dict] = []
        self.largest: dict | None = None
        self.last: dict | None = None  # the batch trained since the previous reading
        self.peak = peak_mib()
        self.plain = T.LocalClient.batch_loss

    def __enter__(self) -> BatchRecorder:
        recorder = self

        def batch_loss(client: T.LocalClient, data: T.Encoded, index):  # noqa: ANN001, ANN202
            recorder.observe()
            batch = T.make_batch(data, index, client.settings.device)
            rows, width = batch["input_ids"].shape
            recorder.last = {"task": client.spec.name, "rows": int(rows), "width": int(width),
                             "tokens": int(rows * width)}
            recorder.shapes[(client.spec.name, int(rows), int(width))] += 1
            if recorder.largest is None or recorder.last["tokens"] > recorder.largest["tokens"]:
                recorder.largest = dict(recorder.last)
            return recorder.plain(client, data, index)

        T.LocalClient.batch_loss = batch_loss
        return self

    def observe(self) -> None:
        now = peak_mib()
        if now - self.peak > self.step_mib:
            self.rises.append({"from_mib": self.peak, "to_mib": now, "batch": self.last})
        self.peak = now

    def __exit__(self, *exc: object) -> None:
        T.LocalClient.batch_loss = self.plain
        self.observe()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--step_mib", type=int, default=8, help="the smallest rise of the peak that is recorded")
    parser.add_argument("run_args", nargs=argparse.REMAINDER, help="fedlease's arguments: run --tasks ...")
    args = parser.parse_args()
    run_args = args.run_args
    with BatchRecorder(args.step_mib) as recorder:
        code = fedlease_main(run_args)
    if code:
        raise SystemExit(code)
    shapes = [{"task": t, "rows": r, "width": w, "tokens": r * w, "batches": n}
              for (t, r, w), n in sorted(recorder.shapes.items(), key=lambda kv: -kv[0][1] * kv[0][2])]
    result = {"benchmark": "peak_batches", "command": ["fedlease", *run_args], "final_peak_mib": recorder.peak,
              "largest_batch": recorder.largest, "rises": recorder.rises, "shapes": shapes}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    summary = {k: result[k] for k in ("benchmark", "final_peak_mib", "largest_batch")}
    summary["last_rise"] = recorder.rises[-1] if recorder.rises else None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
