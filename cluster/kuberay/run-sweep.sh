#!/usr/bin/env bash
# Run the sweep NAME of CONFIG, resuming it if it already exists: the entrypoint of a RayJob (or of
# `ray job submit`) whose retries must continue a sweep, never start it over.
#
#   run-sweep.sh CONFIG NAME [prunetune sweep options...]
#
# 1. `prunetune sweep CONFIG --resume NAME`: continues the interrupted sweep NAME (Tune's state, its
#    MLflow runs, each unfinished trial from its checkpoint).
# 2. Only if that refuses because no sweep NAME exists yet ("no sweep state at ..."), starts it:
#    `prunetune sweep CONFIG --name NAME`. Any other refusal (exit 2: config differs from the
#    recorded one, tracking server unreachable, ...) is the job's failure: starting over would
#    discard the sweep's trials.
# 3. A sweep NAME that already finished is success: nothing to do.
#
# The cluster's MLflow (MLFLOW_TRACKING_URI from the ConfigMap prunetune-endpoints) is passed as
# --tracking-uri, over a config's own (a sqlite file on the head would be out of the workers' reach);
# options given after NAME come later and win.
set -uo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: $0 CONFIG NAME [prunetune sweep options...]" >&2
    exit 2
fi
config=$1
name=$2
shift 2
if [ -n "${MLFLOW_TRACKING_URI:-}" ]; then
    set -- --tracking-uri "$MLFLOW_TRACKING_URI" "$@"
fi
export PYTHONUNBUFFERED=1  # its output is piped below: keep the job log live

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# `ray job stop` sends SIGTERM to every process of the job: prunetune ends the sweep gracefully
# (as Ctrl+C), so this script and tee must outlive it to pass its output and exit code on.
trap 'echo "run-sweep: stop requested; prunetune ends the sweep (resumable)" >&2' TERM INT

echo "run-sweep: resuming sweep $name if it exists"
prunetune sweep "$config" --resume "$name" "$@" 2>&1 | (trap '' TERM INT; exec tee "$log")
rc=${PIPESTATUS[0]}

if [ "$rc" -eq 2 ] && grep -qF -- "--resume $name: no sweep state at" "$log"; then
    echo "run-sweep: no sweep $name yet; starting it"
    prunetune sweep "$config" --name "$name" "$@"
    exit $?
fi
if [ "$rc" -eq 2 ] && grep -qF -- "--resume $name: that sweep already finished" "$log"; then
    echo "run-sweep: sweep $name already finished; nothing to do"
    exit 0
fi
exit "$rc"
