#!/usr/bin/env bash
# Train one moraljax config on a Cloud TPU VM or multi-host slice, fetch the run.
#
#   launch/tpu_vm.sh --name=moraljax-v5e --zone=us-west4-a --project=my-project \
#       --config=configs/ipd_util.py --delete
#   launch/tpu_vm.sh ... --dry_run          # print every command, run nothing
#   launch/tpu_vm.sh ... -- --config.run.num_episodes=200   # flags for moraljax.launch
#
# What it runs, in order (each command is printed before it runs):
#   1. gcloud compute tpus tpu-vm create      (skipped with --reuse)
#   2. the code: a tarball of this checkout copied to every worker with
#      `gcloud compute tpus tpu-vm scp --worker=all`, or --git_url cloned there
#      (and --model_dir copied to ~/moraljax_model on every worker)
#   3. on every worker: Python 3.11 (deadsnakes on the Ubuntu 22.04 TPU image)
#      in ~/moraljax-venv, then `pip install -e . "jax[tpu]==<setup.py's jax>"`
#   4. on every worker at once (--worker=all):
#      python -m moraljax.launch --config=... --workdir=... --distributed
#      Every worker is one JAX process; jax.distributed finds the coordinator
#      from the TPU metadata, the learner axis is split over all chips, and
#      only process 0 writes the run's outputs.
#   5. gcloud compute tpus tpu-vm scp --recurse --worker=0: the workdir back
#      into --local_dir (default runs/)
#   6. with --delete: gcloud compute tpus tpu-vm delete
#
# Defaults make a v5e-8 slice (v5litepod-8, one host with 8 chips, runtime
# v2-alpha-tpuv5-lite). A multi-host slice (e.g. v5litepod-16, 4 hosts) needs
# checkpoints that every host sees: pass --checkpoint_dir=gs://bucket/path
# (gcsfs is then installed too). A failed step stops the script and leaves
# the VM up for inspection; the delete command is printed.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh --name=NAME --config=FILE[:VARIANT] [options] [-- LAUNCH_FLAGS...]
  --name=NAME                TPU VM name (required)
  --config=FILE[:VARIANT]    config to train, relative to the repository (required)
  --zone=ZONE                default us-west4-a
  --project=PROJECT          default: gcloud's configured project
  --accelerator_type=TYPE    default v5litepod-8 (v5e, 8 chips)
  --version=RUNTIME          TPU runtime, default v2-alpha-tpuv5-lite (v5e)
  --workdir=NAME             run name; remote ~/moraljax_runs/NAME (default: config stem[_variant])
  --local_dir=DIR            where the run is copied back to (default runs)
  --checkpoint_dir=URL       shared checkpoint directory (gs://...), needed on multi-host slices
  --git_url=URL [--git_ref=REF]   clone the code on the workers instead of copying this checkout
  --model_dir=DIR            copy a local model directory to ~/moraljax_model on every worker
                             (use it as --config=...:model=~/moraljax_model)
  --spot                     create a Spot VM
  --reuse                    use an existing VM of that name (skip create)
  --delete                   delete the VM at the end
  --dry_run                  print the commands, run nothing
EOF
}

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="" CONFIG="" ZONE="us-west4-a" PROJECT="" ACCELERATOR_TYPE="v5litepod-8"
VERSION="v2-alpha-tpuv5-lite" WORKDIR="" LOCAL_DIR="runs" CHECKPOINT_DIR="" GIT_URL="" GIT_REF=""
MODEL_DIR="" SPOT=0 REUSE=0 DELETE=0 DRY_RUN=0
LAUNCH_FLAGS=()
while (($#)); do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --accelerator_type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --local_dir=*) LOCAL_DIR="${1#*=}" ;;
    --checkpoint_dir=*) CHECKPOINT_DIR="${1#*=}" ;;
    --git_url=*) GIT_URL="${1#*=}" ;;
    --git_ref=*) GIT_REF="${1#*=}" ;;
    --model_dir=*) MODEL_DIR="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --reuse) REUSE=1 ;;
    --delete) DELETE=1 ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; LAUNCH_FLAGS=("$@"); break ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
  shift
done

[[ -n "$NAME" ]] || die "--name is required (the TPU VM name)"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name='$NAME' is not allowed; expected lowercase letters, digits and '-', starting with a letter"
[[ -n "$CONFIG" ]] || die "--config is required (e.g. configs/ipd_util.py)"
[[ -f "$REPO/${CONFIG%%:*}" ]] || die "--config='$CONFIG': ${CONFIG%%:*} is not a file of the repository"
[[ -z "$GIT_REF" || -n "$GIT_URL" ]] || die "--git_ref needs --git_url"
[[ -z "$MODEL_DIR" || -d "$MODEL_DIR" ]] || die "--model_dir='$MODEL_DIR' is not a directory"
[[ -z "$CHECKPOINT_DIR" || "$CHECKPOINT_DIR" == gs://* ]] || die "--checkpoint_dir='$CHECKPOINT_DIR' is not allowed; expected gs://bucket/path (seen by every host)"
if [[ -z "$WORKDIR" ]]; then  # The launcher's default name: config stem[_variant].
  stem="$(basename "${CONFIG%%:*}" .py)"
  variant="${CONFIG#*:}"
  [[ "$CONFIG" == *:* ]] && stem="${stem}_$(printf '%s' "$variant" | tr -c 'A-Za-z0-9.=-' '_')"
  WORKDIR="$stem"
fi
[[ "$WORKDIR" =~ ^[A-Za-z0-9._=-]+$ ]] || die "--workdir='$WORKDIR' is not allowed; expected a run name (letters, digits, . _ = -)"
JAX_VERSION="$(sed -n 's/.*"jax==\([0-9][0-9.]*\)".*/\1/p' "$REPO/setup.py")"
[[ -n "$JAX_VERSION" ]] || die "no jax==X pin found in $REPO/setup.py"

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
TARBALL="${TMPDIR:-/tmp}/moraljax-src-$NAME.tar.gz"
REMOTE_RUN="moraljax_runs/$WORKDIR"  # Relative to the remote home.
VENV="\$HOME/moraljax-venv"

# Shell-quotes one word for printing and for the remote shell: as is when
# safe, else in single quotes (the shortest form a reader can copy).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
quote_all() { local word out=(); for word in "$@"; do out+=("$(quote "$word")"); done; echo "${out[*]}"; }
q() { quote "$1"; }

DELETE_LINE="$(quote_all "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet)"

# Prints one command as a copy-pasteable shell line, then runs it (not with --dry_run).
cmd() {
  quote_all "$@"
  ((DRY_RUN)) && return 0
  "$@" || { local status=$?
    echo "tpu_vm.sh: failed (exit $status); the VM '$NAME' may still be up. Delete it with: $DELETE_LINE" >&2
    exit "$status"; }
}

# 1. The VM.
if ((!REUSE)); then
  create=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION")
  ((SPOT)) && create+=(--spot)
  cmd "${create[@]}"
fi

# 2. The code (and model) on every worker.
if [[ -n "$GIT_URL" ]]; then
  fetch_code="rm -rf ~/moraljax && git clone $(q "$GIT_URL") ~/moraljax"
  [[ -n "$GIT_REF" ]] && fetch_code+=" && git -C ~/moraljax checkout $(q "$GIT_REF")"
else
  cmd tar -czf "$TARBALL" -C "$REPO" --exclude=./.git --exclude=./runs --exclude=./workdir --exclude=./workdirs \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache .
  cmd "${GCLOUD[@]}" scp "$TARBALL" "$NAME":moraljax-src.tar.gz "${WHERE[@]}" --worker=all
  fetch_code="rm -rf ~/moraljax && mkdir -p ~/moraljax && tar -xzf ~/moraljax-src.tar.gz -C ~/moraljax"
fi
if [[ -n "$MODEL_DIR" ]]; then
  cmd "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="rm -rf ~/moraljax_model"
  cmd "${GCLOUD[@]}" scp --recurse "${MODEL_DIR%/}" "$NAME":moraljax_model "${WHERE[@]}" --worker=all
fi

# 3. Python 3.11 and the package (the README's `pip install -e .`, with the TPU jaxlib).
packages="-e . \"jax[tpu]==$JAX_VERSION\""
[[ -n "$CHECKPOINT_DIR" ]] && packages+=" gcsfs"
setup="set -euo pipefail; $fetch_code"
setup+="; if ! command -v python3.11 >/dev/null; then sudo add-apt-repository -y ppa:deadsnakes/ppa"
setup+=" && sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv; fi"
setup+="; [ -x $VENV/bin/python ] || python3.11 -m venv $VENV"
setup+="; $VENV/bin/pip install -q --upgrade pip"
setup+="; cd ~/moraljax && $VENV/bin/pip install $packages"
cmd "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$setup"

# 4. Train on every worker at once: one JAX process per host.
train="cd ~/moraljax && mkdir -p ~/moraljax_runs && $VENV/bin/python -m moraljax.launch"
train+=" --config=$(q "$CONFIG") --workdir=\"\$HOME/$REMOTE_RUN\" --distributed --noprogress"
[[ -n "$CHECKPOINT_DIR" ]] && train+=" --checkpoint_dir=$(q "$CHECKPOINT_DIR")"
for flag in ${LAUNCH_FLAGS[@]+"${LAUNCH_FLAGS[@]}"}; do train+=" $(q "$flag")"; done
cmd "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$train"

# 5. The run's outputs (written by process 0 only) back from worker 0.
cmd mkdir -p "$LOCAL_DIR"
cmd "${GCLOUD[@]}" scp --recurse "$NAME:$REMOTE_RUN" "$LOCAL_DIR" "${WHERE[@]}" --worker=0

# 6. The VM.
if ((DELETE)); then
  cmd "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
else
  echo "tpu_vm.sh: the VM '$NAME' is still up (add --delete next time); delete it with: $DELETE_LINE" >&2
fi
echo "tpu_vm.sh: run outputs in $LOCAL_DIR/$WORKDIR" >&2
