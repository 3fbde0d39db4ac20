"""Where a run's memory grows: ``fedlease run`` in this process, its RSS sampled every 0.5 s beside it.

    python benchmarks/rss_timeline.py OUT.json run --tasks ... (any fedlease run arguments)

Writes OUT.json: the samples ``[seconds since start, RSS MiB]``, each round's end in the same clock (the run's
own per-round seconds accumulated backwards from its end; the setup is what precedes the first round), and the
jumps of more than 20 MiB between two samples, and at each sample where RSS grew by more than 15 MiB the main
thread's Python stack (``RSS_SAMPLE_SECONDS`` sets the sampling period, default 0.5; also printed on stderr as
they come). Used to find which phase of the scale benchmark's 1,000-client
run holds the memory that the 20-client run does not (issue 33).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

from fedlease.cli import main


def rss_mib() -> int:
    """This process's resident set size (Linux: /proc/self/statm, in pages)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20


STACK_STEP_MIB = 15  # growth between two samples after which the main thread's stack is recorded


def sample(samples: list, stacks: list, start: float, stop: threading.Event, every: float) -> None:
    """RSS every ``every`` seconds; where it grew by more than STACK_STEP_MIB since the last sample, what the
    main thread was running then (its Python stack): the code that allocated is on it, or has just left it."""
    main_thread = threading.main_thread().ident
    while not stop.is_set():
        now, rss = round(time.perf_counter() - start, 2), rss_mib()
        if samples and rss - samples[-1][1] > STACK_STEP_MIB:
            frame = sys._current_frames().get(main_thread)
            frames = traceback.extract_stack(frame) if frame else []
            # fedlease's own frames (where the allocation was asked for) and the innermost few (what allocated)
            keep = [f for f in frames[:-4] if "/fedlease/" in f.filename] + frames[-4:]
            stack = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in keep]
            stacks.append({"seconds": now, "from_mib": samples[-1][1], "to_mib": rss, "stack": stack})
            print(json.dumps(stacks[-1]), file=sys.stderr, flush=True)
        samples.append((now, rss))
        time.sleep(every)


def timeline(out: Path, args: list[str]) -> int:
    samples: list = []
    stacks: list = []
    start, stop = time.perf_counter(), threading.Event()
    every = float(os.environ.get("RSS_SAMPLE_SECONDS", "0.5"))
    threading.Thread(target=sample, args=(samples, stacks, start, stop, every), daemon=True).start()
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
                               "jumps": jumps, "stacks": stacks, "samples": samples}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(timeline(Path(sys.argv[1]), sys.argv[2:]))
