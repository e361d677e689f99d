#!/usr/bin/env bash
# The project's one test command (README "Set-up"): installs what the tests need, then runs them all.
#   bash tests/run.sh [pytest args]
# As root it also installs the system packages for the real Slurm cluster the tests start
# (.ci/install-slurm.sh), libaio for DeepSpeed's NVMe offload and shellcheck for the batch-script test;
# elsewhere those tests skip with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch's CPU build first: a bare `torch` requirement with no torch installed pulls several GB of CUDA.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
# The versions seen working together (tests/constraints.txt), so a new release cannot break CI.
"$PY" -m pip install -q -c tests/constraints.txt -e '.[dev]'

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  missing=()
  for pkg in libaio-dev shellcheck; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null
  fi
fi

# DeepSpeed's JIT ops, built in the background at the lowest priority while the Slurm packages install and
# the first tests run (tests/prebuild_ops.py says why), when the whole suite runs (no test paths or -k among
# the arguments). Waited for, never killed: a build killed halfway leaves torch's lock behind, and every
# later load of that op waits on it.
whole=1
for arg in "$@"; do
  case "$arg" in -*) ;; *) whole=0 ;; esac
done
ops_pid=
if [ "$whole" = 1 ]; then
  ops_log=$(mktemp "${TMPDIR:-/tmp}/launcher-prebuild-ops.XXXXXX")
  nice -n 19 "$PY" tests/prebuild_ops.py >"$ops_log" 2>&1 &
  ops_pid=$!
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  bash .ci/install-slurm.sh
fi

rc=0
"$PY" -m pytest -q "$@" || rc=$?
if [ -n "$ops_pid" ]; then
  wait "$ops_pid" || true
  grep "^prebuild_ops:" "$ops_log" || true
  rm -f "$ops_log"
fi
exit "$rc"
