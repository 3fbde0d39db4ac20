"""Where an adaptive round's CPU time goes at two federation sizes: the open-federation scale run under cProfile.

Each size is the setting of ``open_federation.py`` (FedLEASE, the built-in tasks, a quarter of the clients per task,
20 training / 10 test examples per client, 1 local epoch, 8 rounds of which 2 warmup, 10 clients a round, fp32),
run in a fresh process with one thread; the adaptive rounds after the allocation (rounds 4 to 7) are profiled
with the process's CPU time as the clock (``time.process_time``), so the split holds when other work shares the
cores; the run stops before its last round (which evaluates every client). Prints one JSON object as the last
line of stdout: per size the CPU seconds of each round and, for the functions of fedlease that take the most, their
cumulative CPU seconds over the profiled rounds and how often they ran; and the largest differences between the
sizes. ``--quick``: a small pair of sizes and few examples (the test suite runs it on a tiny model).

    python benchmarks/round_profile.py [--sizes 20 1000] [--model_name M] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TASKS = ("rotten_tomatoes", "snli", "newsgroups", "election_tweets")
CHILD = """
import cProfile, json, pstats, sys, time
import torch
torch.set_num_threads(1)
from fedlease.runtime import loop
from fedlease.cli import main
out, first, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rounds = int(args[args.index("--global_rounds") + 1])
profile = cProfile.Profile(time.process_time)
seconds = {}
plain = loop.Federation.round

class Stop(BaseException):
    pass

def profiled(self, rnd, waiting=None):
    if rnd == rounds - 1:
        raise Stop
    start = time.process_time()
    if rnd >= first:
        profile.enable()
    try:
        return plain(self, rnd, waiting)
    finally:
        if rnd >= first:
            profile.disable()
        seconds[rnd + 1] = time.process_time() - start

loop.Federation.round = profiled
try:
    code = main(args)
except Stop:
    code = 0
if code:
    sys.exit(code)
stats = pstats.Stats(profile)
functions = {}
for (path, line, name), (_, calls, _, cumulative, _) in stats.stats.items():
    if "/fedlease/" in path:
        key = path.split("/fedlease/", 1)[1] + ":" + name
        before = functions.get(key, (0, 0.0))
        functions[key] = (before[0] + calls, before[1] + cumulative)
json.dump({"cpu_seconds_by_round": seconds, "functions": functions}, open(out, "w"))
"""


def profile_size(clients: int, per_round: int, rounds: int, warmup: int, samples: int, model: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = ["run", "--tasks", *(f"{task}:{clients // len(TASKS)}" for task in TASKS),
                "--clients_per_round", str(per_round), "--global_rounds", str(rounds), "--warmup_rounds", str(warmup),
                "--local_epochs", "1",
                "--train_samples", str(samples), "--test_samples", str(max(4, samples // 2)), "--batch_size", "16",
                "--allow_overlap", "--precision", "fp32", "--output_dir", f"{tmp}/run", "--no_progress",
                *(["--model_name", model] if model else [])]
        out = Path(tmp) / "profile.json"
        proc = subprocess.run([sys.executable, "-c", CHILD, str(out), str(warmup + 1), *args], capture_output=True,
                              text=True)
        if proc.returncode:
            raise SystemExit(f"the run with {clients} clients failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def summary(profile: dict, top: int, first: int) -> dict:
    """``first``: the first profiled round, 0-based (the rounds after the allocation round)."""
    functions = sorted(profile["functions"].items(), key=lambda kv: -kv[1][1])[:top]
    seconds = profile["cpu_seconds_by_round"]
    profiled = [s for r, s in seconds.items() if int(r) > first]
    return {"cpu_seconds_by_round": {r: round(s, 3) for r, s in seconds.items()},
            "cpu_seconds_per_profiled_round": sum(profiled) / max(len(profiled), 1),
            "functions": {name: {"calls": calls, "cpu_seconds": round(cum, 3)} for name, (calls, cum) in functions}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=None, help="two federation sizes (default 20 1000)")
    parser.add_argument("--model_name", default=None)
    parser.add_argument("--quick", action="store_true", help="sizes 8 and 40, 4 a round, 5 rounds, 8 examples each")
    parser.add_argument("--top", type=int, default=25, help="functions listed per size")
    args = parser.parse_args()
    sizes, per_round, rounds, warmup, samples = ((8, 40), 4, 5, 1, 8) if args.quick else ((20, 1000), 10, 8, 2, 20)
    sizes = args.sizes or sizes
    profiles = {n: profile_size(n, per_round, rounds, warmup, samples, args.model_name) for n in sizes}
    small, large = (profiles[n]["functions"] for n in sizes)
    differences = sorted(((name, large.get(name, (0, 0.0))[1] - small.get(name, (0, 0.0))[1])
                          for name in set(small) | set(large)), key=lambda kv: -kv[1])[:args.top]
    result = {"benchmark": "round_profile", "clients_per_round": per_round, "rounds": rounds, "warmup_rounds": warmup,
              "samples_per_client": samples,
              "profiled_rounds": list(range(warmup + 2, rounds)), "clock": "process CPU time",
              "sizes": {str(n): summary(profiles[n], args.top, warmup + 1) for n in sizes},
              "largest_cpu_differences": {name: round(diff, 3) for name, diff in differences}}
    per_round = [result["sizes"][str(n)]["cpu_seconds_per_profiled_round"] for n in sizes]
    print(f"CPU seconds per adaptive round: {sizes[0]} clients {per_round[0]:.2f}, {sizes[1]} clients "
          f"{per_round[1]:.2f} ({per_round[1] / per_round[0]:.2f}x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
