#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: one JAX process per TPU VM worker, started on all workers over
# `gcloud compute tpus tpu-vm ssh --worker=all`. JAX finds the pod's workers itself (--jax_distributed).
#
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b
#   launch/tpu_pod.sh setup                                  # copy this repo + pip install on every worker
#   CONFIG=configs/sd15.py WORKDIR=/mnt/shared/runs/sd15 launch/tpu_pod.sh run \
#       --config.teacher.path=/mnt/shared/models/stable-diffusion-v1-5 \
#       --config.pairs.prompts=/mnt/shared/data/laion_a625.parquet
#   launch/tpu_pod.sh logs          # follow worker 0's log (`logs 3` for worker 3)
#   launch/tpu_pod.sh kill          # stop the run on every worker
#
# WORKDIR (and teacher / prompt files) must be a path that every worker sees with the same content: an NFS /
# Filestore mount or a gcsfuse-mounted bucket at the same mount point on all workers (see launch/README.md).
# Re-running `run` with the same arguments resumes from the latest checkpoint in WORKDIR.
#
# Environment:
#   TPU_NAME, ZONE  the TPU VM (required)
#   PROJECT         GCP project (default: gcloud's configured project)
#   GCLOUD_FLAGS    extra flags for every gcloud call, e.g. "--tunnel-through-iap" or "--internal-ip"
#   REPO_URL        setup: `git clone` this URL on the workers instead of copying the local checkout
#   REPO_REF        setup: branch / tag / commit to check out with REPO_URL (default: the remote's default)
#   REMOTE_DIR      repository location on the workers (default: d2g_jax, i.e. ~/d2g_jax)
#   VENV            virtualenv path on the workers; setup creates it, run activates it (default: none, pip --user)
#   CONFIG          run: config file (default: configs/sd15.py)
#   WORKDIR         run: shared run directory (required for run)
#   LOG             run/logs: log file on each worker (default: ~/d2g_run.log)

set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: launch/tpu_pod.sh setup
       launch/tpu_pod.sh run [--config.x=y ...]      (needs WORKDIR; extra args go to d2g_jax.main)
       launch/tpu_pod.sh logs [WORKER]               (default worker 0)
       launch/tpu_pod.sh kill
Required environment: TPU_NAME, ZONE. See the header of this file for the others.
USAGE
  exit 2
}

[[ $# -ge 1 ]] || usage
cmd=$1
shift
[[ -n "${TPU_NAME:-}" && -n "${ZONE:-}" ]] || { echo "error: set TPU_NAME and ZONE" >&2; usage; }

REMOTE_DIR=${REMOTE_DIR:-d2g_jax}
VENV=${VENV:-}
CONFIG=${CONFIG:-configs/sd15.py}
# '~' is expanded by the shell on the worker, not here.
# shellcheck disable=SC2088
LOG=${LOG:-'~/d2g_run.log'}
# shellcheck disable=SC2088
PIDFILE='~/d2g_run.pid'

GFLAGS=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && GFLAGS+=(--project="$PROJECT")
if [[ -n "${GCLOUD_FLAGS:-}" ]]; then
  read -r -a extra_gflags <<<"$GCLOUD_FLAGS"
  GFLAGS+=("${extra_gflags[@]}")
fi

# remote WORKER SCRIPT: run a bash script on one worker ("all" = every worker, in parallel).
remote() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GFLAGS[@]}" --worker="$1" --command="$2"
}

# The remote prologue: strict mode, cd into the repo, activate the venv if any.
prologue() {
  printf 'set -euo pipefail; cd %s; ' "$REMOTE_DIR"
  if [[ -n "$VENV" ]]; then printf 'source %s/bin/activate; ' "$VENV"; fi
}

case "$cmd" in
  setup)
    [[ $# -eq 0 ]] || usage
    if [[ -n "${REPO_URL:-}" ]]; then
      fetch="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch --all --tags; \
else git clone $(printf %q "$REPO_URL") $REMOTE_DIR; fi"
      [[ -n "${REPO_REF:-}" ]] && fetch+="; git -C $REMOTE_DIR checkout $(printf %q "$REPO_REF")"
      # On a branch (not a detached tag/commit): bring it up to date.
      fetch+="; if git -C $REMOTE_DIR symbolic-ref -q HEAD >/dev/null; then git -C $REMOTE_DIR pull --ff-only; fi"
      remote all "set -euo pipefail; $fetch"
    else
      # Copy the local checkout: tracked + untracked-but-not-ignored files, so uncommitted edits come along.
      # (Files deleted locally are not deleted on the workers.)
      root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
      tmpdir=$(mktemp -d)
      trap 'rm -rf "$tmpdir"' EXIT
      (cd "$root" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done \
        | tar -czf "$tmpdir/d2g_src.tar.gz" --null -T -)
      gcloud compute tpus tpu-vm scp "$tmpdir/d2g_src.tar.gz" "$TPU_NAME":d2g_src.tar.gz "${GFLAGS[@]}" --worker=all
      remote all "set -euo pipefail; mkdir -p $REMOTE_DIR; tar -xzf d2g_src.tar.gz -C $REMOTE_DIR; rm d2g_src.tar.gz"
    fi
    venv=""
    [[ -n "$VENV" ]] && venv="[ -d $VENV ] || python3 -m venv $VENV; source $VENV/bin/activate; "
    user="--user"
    [[ -n "$VENV" ]] && user=""
    # `-e .` installs the package and its requirements; `jax[tpu]` then adds libtpu matching the jax version.
    remote all "set -euo pipefail; ${venv}cd $REMOTE_DIR; \
python3 -m pip install $user -e .; python3 -m pip install $user -U 'jax[tpu]'; \
python3 -c 'import jax, d2g_jax; print(\"worker ready: jax\", jax.__version__)'"
    ;;

  run)
    : "${WORKDIR:?set WORKDIR to a run directory shared by all workers}"
    if [[ "$WORKDIR" == gs://* ]]; then
      echo "error: WORKDIR=$WORKDIR: d2g_jax writes its workdir with ordinary file I/O, so use a path that is" \
        "mounted on every worker (Filestore/NFS, or the bucket mounted with gcsfuse); see launch/README.md." >&2
      exit 2
    fi
    args=(python3 -m d2g_jax.main --jax_distributed --config="$CONFIG" --workdir="$WORKDIR" "$@")
    quoted=$(printf '%q ' "${args[@]}")
    # Detached with nohup so that closing this ssh session does not stop training; the pid file is for `kill`.
    remote all "$(prologue)if [ -f $PIDFILE ] && kill -0 \$(cat $PIDFILE) 2>/dev/null; then \
echo \"worker \$(hostname): a run is already going (pid \$(cat $PIDFILE)); use kill first\" >&2; exit 1; fi; \
PYTHONUNBUFFERED=1 nohup $quoted > $LOG 2>&1 < /dev/null & echo \$! > $PIDFILE; \
echo \"worker \$(hostname): started pid \$!, log $LOG\""
    echo "started on all workers; follow with: $0 logs"
    ;;

  logs)
    [[ $# -le 1 ]] || usage
    worker=${1:-0}
    [[ "$worker" =~ ^[0-9]+$ ]] || usage
    remote "$worker" "tail -n 200 -F $LOG"
    ;;

  kill)
    [[ $# -eq 0 ]] || usage
    # SIGTERM, then SIGKILL after 30 s; the TPU is only released once the process is gone.
    remote all "if [ -f $PIDFILE ]; then pid=\$(cat $PIDFILE); kill \$pid 2>/dev/null || true; \
for _ in \$(seq 30); do kill -0 \$pid 2>/dev/null || break; sleep 1; done; kill -9 \$pid 2>/dev/null || true; \
rm -f $PIDFILE; echo \"worker \$(hostname): stopped \$pid\"; else echo \"worker \$(hostname): no run\"; fi"
    ;;

  *)
    usage
    ;;
esac
