"""Where a run's memory grows: ``fedlease run`` in this process, its RSS sampled every 0.5 s beside it.

    python benchmarks/rss_timeline.py OUT.json run --tasks ... (any fedlease run arguments)

Writes OUT.json: the samples ``[seconds since start, RSS MiB]``, each round's end in the same clock (the run's
own per-round seconds accumulated backwards from its end; the setup is what precedes the first round), and the
jumps of more than 20 MiB between two samples. Used to find which phase of the scale benchmark's 1,000-client
run holds the memory that the 20-client run does not (issue 33).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from fedlease.cli import main


def rss_mib() -> int:
    """This process's resident set size (Linux: /proc/self/statm, in pages)."""
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20


def sample(samples: list, start: float, stop: threading.Event) -> None:
    while not stop.is_set():
        samples.append((round(time.perf_counter() - start, 1), rss_mib()))
        time.sleep(0.5)


def timeline(out: Path, args: list[str]) -> int:
    samples: list = []
    start, stop = time.perf_counter(), threading.Event()
    threading.Thread(target=sample, args=(samples, start, stop), daemon=True).start()
    code = main(args)
    end = time.perf_counter() - start
    stop.set()
    run_dir = Path(args[args.index("--output_dir") + 1])
    rounds = [r["seconds"] for r in json.loads((run_dir / "training_history.json").read_text())["rounds"]]
    ends, t = [], end
    for seconds in reversed(rounds):  # the run's last act is the last round's record; setup is what precedes
        ends.insert(0, round(t, 1))
        t -= seconds
    jumps = [(t, a, b) for (_, a), (t, b) in zip(samples, samples[1:], strict=False) if b - a > 20]
    out.write_text(json.dumps({"args": args, "round_ends": ends, "peak_mib": max(v for _, v in samples),
                               "jumps": jumps, "samples": samples}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(timeline(Path(sys.argv[1]), sys.argv[2:]))
