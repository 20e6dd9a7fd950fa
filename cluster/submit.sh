#!/usr/bin/env bash
# Submit a wss-ray command (a stage, a sweep or the whole pipeline) as a Ray job and follow its
# logs. The repository is the job's working dir; data and --storage must be paths or URIs every
# node can reach (an object store on a cloud cluster).
#
#   export RAY_ADDRESS=http://127.0.0.1:8265     # `ray dashboard ray_cluster.yaml` tunnels this port
#   cluster/submit.sh train separator --data s3://bucket/features --parent s3://bucket/runs/tune-transcriptor/best.json --storage s3://bucket/runs --gpu
#   cluster/submit.sh tune separator --space tune_spaces/separator.yaml --data ... --storage s3://bucket/runs
#   cluster/submit.sh pipeline --config configs/paper.yaml --out /shared/paper --data /shared/features
#
# --no-wait returns at once; follow later with `ray job logs --follow JOB_ID`, stop with `ray job stop JOB_ID`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${RAY_ADDRESS:-}" ]; then
  echo "cluster/submit.sh: set RAY_ADDRESS to the cluster's job server (http://127.0.0.1:8265 through 'ray dashboard ray_cluster.yaml')" >&2
  exit 2
fi
wait_flag=()
if [ "${1:-}" = "--no-wait" ]; then wait_flag=(--no-wait); shift; fi
if [ $# -eq 0 ]; then sed -n '2,12p' "$0" >&2; exit 2; fi
export RAY_AUTH_MODE=token  # the client sends the token from ~/.ray/auth_token (or RAY_AUTH_TOKEN[_PATH])
RAY=${RAY:-ray}
PYTHON=${PYTHON:-python}
exec "$RAY" job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env cluster/runtime_env.yaml \
  "${wait_flag[@]}" -- "$PYTHON" -m wss_ray.cli "$@"
