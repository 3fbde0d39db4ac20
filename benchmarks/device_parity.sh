#!/usr/bin/env bash
# Numerical parity on a lent GPU machine (issue 32), in one call of the device tool: FedLEASE on the GLUE
# comparison's setting and on the quick start's, seeds 1-3, in CUDA fp32 and CUDA bf16 autocast; the quick start
# also in fp32 on that machine's CPU, with the same weights. Every (setting, variant, seed) is its own
# `fedlease compare` process, all at once; finished runs are packed into $OUT/runs.tar.gz every 30 s, so what
# finished comes back even if the call is cut at its limit.
#
# The encoder is the offline MiniLM carried as per-row int8 weights (tools/minilm_int8.py pack .carry/minilm-int8)
# and dequantised here to fp32, and GLUE's TSVs are carried too (cp -r ../shared/glue .carry/glue; not committed):
#
#   device run, carry [".carry"]:  OUT=$OUT bash benchmarks/device_parity.sh
#
# Back here, each setting's table comes from merge_comparison.py with the variants as method specs (their
# overrides name the device, the precision and the dequantised model), against this CPU's fp32 runs for GLUE:
#
#   python benchmarks/merge_comparison.py benchmarks/results/comparison_glue_rerun/runs PARITY/glue/* \
#       --into benchmarks/results/gpu/parity/glue --methods fedlease \
#       "fedlease:device=cuda,precision=fp32,model_name=/tmp/parity/minilm" \
#       "fedlease:device=cuda,precision=bf16,model_name=/tmp/parity/minilm"
#
# Environment: SEEDS (default "1 2 3"), BUDGET (seconds before packing the last time, default 480), GPU (the
# variants' device, default cuda), SETTINGS ("glue quick"), MODEL (a model folder instead of the carried int8
# MiniLM), GLUE_DIR (default ../shared/glue, made from .carry/glue where missing), GLUE_SIZE / QUICK_SIZE (the
# settings' flags), CPU_THREADS (threads of each CPU run, default 3; each GPU run's host side has one). With the
# defaults 15 runs start at once (12 on the GPU, 3 on 9 CPU threads) on a 16-core machine.
set -u
: "${OUT:?set OUT to the folder whose files come back}"
SEEDS=${SEEDS:-"1 2 3"}
BUDGET=${BUDGET:-480}
GPU=${GPU:-cuda}
SETTINGS=${SETTINGS:-"glue quick"}
WORK=${WORK:-/tmp/parity}
PYTHON=${PYTHON:-python3}
GLUE_DIR=${GLUE_DIR:-../shared/glue}
CPU_THREADS=${CPU_THREADS:-3}
GLUE_SIZE=${GLUE_SIZE:-"--tasks sst2:2 qnli:2 mrpc:2 qqp:2 --data_dir $GLUE_DIR --train_samples 250 --test_samples 100 --batch_size 16 --global_rounds 7 --warmup_rounds 2"}
QUICK_SIZE=${QUICK_SIZE:-"--tasks rotten_tomatoes:2 snli:2 newsgroups:2 election_tweets:2 --global_rounds 5 --warmup_rounds 3 --train_samples 128 --test_samples 64 --batch_size 16"}
source benchmarks/lib/device.sh
device_setup || exit 1
case " $SETTINGS " in *" glue "*)
    if [ ! -d "$GLUE_DIR" ]; then mkdir -p "$(dirname "$GLUE_DIR")" && cp -r .carry/glue "$GLUE_DIR" || exit 1; fi ;;
esac
start=$SECONDS
for setting in $SETTINGS; do
    variants="$GPU:fp32 $GPU:bf16"
    case $setting in
        glue) size=$GLUE_SIZE ;;
        quick) size=$QUICK_SIZE; [ "$GPU" = cpu ] || variants="$variants cpu:fp32" ;;
        *) echo "unknown setting $setting (glue, quick)" >>"$OUT/device.txt"; exit 2 ;;
    esac
    for variant in $variants; do
        spec="fedlease:device=${variant%%:*},precision=${variant##*:},model_name=$MODEL"
        threads=$CPU_THREADS; [ "${variant%%:*}" = cpu ] || threads=1  # a GPU run's host side: one thread
        for seed in $SEEDS; do
            mkdir -p "$WORK/$setting"
            # shellcheck disable=SC2086
            OMP_NUM_THREADS=$threads $PYTHON -m fedlease compare --methods "$spec" --seeds "$seed" $size \
                --output_dir "$WORK/$setting/${variant/:/_}_seed$seed" --no_progress \
                >"$WORK/$setting/${variant/:/_}_seed$seed.log" 2>&1 &
        done
    done
done
watch_runs "$BUDGET" "*/*/*/seed_*/results.md"
