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

# DeepSpeed's JIT ops (tests/prebuild_ops.py says why), when the whole suite runs (no test paths or -k among
# the arguments): the shared-memory comm op, which every DeepSpeed process group on CPU loads (the first
# cluster test's jobs at once), at normal priority while the Slurm packages install; the others in the
# background at the lowest priority. Waited for, never killed: a build killed halfway leaves torch's lock
# behind, and every later load of that op waits on it.
whole=1
for arg in "$@"; do
  case "$arg" in -*) ;; *) whole=0 ;; esac
done
ops_pid=
first_pid=
if [ "$whole" = 1 ]; then
  ops_log=$(mktemp "${TMPDIR:-/tmp}/launcher-prebuild-ops.XXXXXX")
  first_log=$(mktemp "${TMPDIR:-/tmp}/launcher-prebuild-ops.XXXXXX")
  "$PY" tests/prebuild_ops.py ShareMemCommBuilder >"$first_log" 2>&1 &
  first_pid=$!
  nice -n 19 "$PY" tests/prebuild_ops.py CPUAdamBuilder PinMemoryBuilder AsyncIOBuilder >"$ops_log" 2>&1 &
  ops_pid=$!
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  bash .ci/install-slurm.sh
fi
if [ -n "$first_pid" ]; then
  wait "$first_pid" || true
fi

rc=0
"$PY" -m pytest -q "$@" || rc=$?
if [ -n "$ops_pid" ]; then
  wait "$ops_pid" || true
  grep -h "^prebuild_ops:" "$first_log" "$ops_log" || true
  rm -f "$first_log" "$ops_log"
fi
exit "$rc"
