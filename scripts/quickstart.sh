#!/usr/bin/env bash
# The README's first command: set up .venv if needed, then run FedLEASE on the built-in offline tasks at a
# quick-start size (8 clients, 2 per task; 5 rounds, 3 of warmup; 128 train / 64 test examples per client).
# Extra arguments are passed to `fedlease run` and override these (e.g. --output_dir, --device cuda).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$root/scripts/venv.sh")
exec "$venv/bin/fedlease" run \
    --tasks rotten_tomatoes:2 snli:2 newsgroups:2 election_tweets:2 \
    --global_rounds 5 --warmup_rounds 3 --train_samples 128 --test_samples 64 --batch_size 16 \
    --output_dir "$root/runs/quickstart" --overwrite "$@"
