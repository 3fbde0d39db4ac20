# What the device scripts (benchmarks/device_*.sh) share; sourced, not run. They set OUT (the folder whose files
# come back), WORK (where the runs are written) and PYTHON before sourcing.

export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# $OUT/device.txt: the GPU and the versions; MODEL: the carried int8 MiniLM dequantised into $WORK/minilm, unless
# MODEL is set already (a model folder on the machine)
device_setup() {
    mkdir -p "$WORK"
    (nvidia-smi || true; $PYTHON -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)") >"$OUT/device.txt" 2>&1
    if [ -z "${MODEL:-}" ]; then
        MODEL=$WORK/minilm
        $PYTHON tools/minilm_int8.py unpack .carry/minilm-int8 "$MODEL" >>"$OUT/device.txt" 2>&1 || return 1
    fi
}

# $OUT/runs.tar.gz: every run in $WORK, without weights, checkpoints or the model
pack_runs() {
    # tar exits 1 when a file (a log still being written) changed while it read it: the pack is still good
    tar czf "$OUT/runs.tar.gz.part" -C "$WORK" --warning=no-file-changed --exclude checkpoint --exclude final \
        --exclude clients --exclude minilm --exclude 'round_summary_*.json' --exclude 'lora_client_map_round_*.json' .
    [ $? -le 1 ] && mv "$OUT/runs.tar.gz.part" "$OUT/runs.tar.gz"
}

# pack every POLL seconds (30) while background jobs run, until $1 seconds from $start; then once more.
# $2: the glob (under $WORK) of a finished run's results.md, counted in device.txt
watch_runs() {
    while [ $((SECONDS - start)) -lt "$1" ] && [ -n "$(jobs -r)" ]; do
        left=$(($1 - (SECONDS - start)))
        sleep $((left < ${POLL:-30} ? left : ${POLL:-30}))
        pack_runs
        # shellcheck disable=SC2086
        echo "$((SECONDS - start)) s: $(ls -d $WORK/$2 2>/dev/null | wc -l) runs finished" >>"$OUT/device.txt"
    done
    pack_runs
    echo "packed after $((SECONDS - start)) s; still running: $(jobs -r | wc -l)" >>"$OUT/device.txt"
}
