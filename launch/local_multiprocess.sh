#!/usr/bin/env bash
# Smoke-test the multi-process code paths on one machine, no cluster: N CPU processes (default 2), each with
# DEV fake CPU devices, joined through a coordinator on localhost. Exactly what a multi-host job does, minus the
# accelerators (jax.distributed, per-process data slices, Orbax multi-process checkpointing, the shared workdir).
#
#   launch/local_multiprocess.sh                                   # configs/tiny.py, 2 processes x 2 devices
#   NPROC=4 DEV=1 WORKDIR=/tmp/d2g_mp4 launch/local_multiprocess.sh --config.train.num_steps=20
#
# Arguments go to every d2g_jax.main process. Process i logs to $WORKDIR/proc_i.log. Exits non-zero (and stops
# the other processes) as soon as any process fails. Re-running with the same WORKDIR resumes, as on a cluster.
#
# Environment:
#   NPROC    number of processes                      (default: 2)
#   DEV      CPU devices per process                  (default: 2; mesh = NPROC*DEV devices)
#   CONFIG   config file                              (default: configs/tiny.py)
#   WORKDIR  run directory shared by the processes    (default: /tmp/d2g_multiprocess)
#   PORT     coordinator port on 127.0.0.1            (default: 29876)
#   PYTHON   python interpreter                       (default: python)

set -euo pipefail

usage() {
  echo "usage: [NPROC=2] [DEV=2] [CONFIG=configs/tiny.py] [WORKDIR=/tmp/d2g_multiprocess] [PORT=29876]" \
    "$0 [--config.x=y ...]" >&2
  exit 2
}
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && usage

NPROC=${NPROC:-2}
DEV=${DEV:-2}
CONFIG=${CONFIG:-configs/tiny.py}
WORKDIR=${WORKDIR:-/tmp/d2g_multiprocess}
PORT=${PORT:-29876}
PYTHON=${PYTHON:-python}
[[ "$NPROC" =~ ^[1-9][0-9]*$ && "$DEV" =~ ^[1-9][0-9]*$ && "$PORT" =~ ^[0-9]+$ ]] || usage

cd "$(dirname "$0")/.."
mkdir -p "$WORKDIR"

pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "d2g: $NPROC processes x $DEV CPU devices, coordinator 127.0.0.1:$PORT, workdir $WORKDIR"
for ((i = 0; i < NPROC; i++)); do
  JAX_PLATFORMS=cpu \
    XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEV" \
    PYTHONUNBUFFERED=1 \
    "$PYTHON" -m d2g_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator_address="127.0.0.1:$PORT" --num_processes="$NPROC" --process_id="$i" "$@" \
    >"$WORKDIR/proc_$i.log" 2>&1 &
  pids+=($!)
  echo "  process $i: pid ${pids[$i]}, log $WORKDIR/proc_$i.log"
done

# Poll instead of waiting in order: a crashed process would otherwise leave the others blocked in a collective.
remaining=$NPROC
declare -A done_
while ((remaining > 0)); do
  for ((i = 0; i < NPROC; i++)); do
    [[ -n "${done_[$i]:-}" ]] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    done_[$i]=1
    remaining=$((remaining - 1))
    if ((rc != 0)); then
      echo "d2g: process $i failed (exit $rc); stopping the others. Last lines of $WORKDIR/proc_$i.log:" >&2
      tail -n 30 "$WORKDIR/proc_$i.log" >&2
      exit "$rc"
    fi
    echo "  process $i: done"
  done
  sleep 1
done
trap - EXIT
echo "d2g: all $NPROC processes finished; logs in $WORKDIR/proc_*.log"
