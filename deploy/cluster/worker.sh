#!/usr/bin/env bash
# This machine's Prefect worker: deploy/cluster/worker.sh gpu|cpu [--name NAME] [prefect worker start options]
#
# One per machine, in the pool of its class (deploy/prefect.yaml). Before starting it, set in the environment:
#   PREFECT_API_URL=http://SERVER:4200/api     the shared Prefect server
#   EVOFORGE_RUNS=s3://BUCKET/runs             the lake every machine reads and writes
#   AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION   for that S3 store
#   EVOFORGE_HOME=/local/disk/evoforge         optional: this machine's caches, logs and temp (default: the checkout)
# It runs `prefect worker start --pool POOL --type process` with evoforge's home settings, so the worker and
# the flow runs it starts keep Prefect's, vLLM's and Hugging Face's files under EVOFORGE_HOME. Stop it with
# Ctrl-C (a worker ignores the first SIGTERM: send two, or SIGINT); the flow run it was running stops with it,
# and the round that dispatched it starts it again on another worker of the pool.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${EVOFORGE_PYTHON:-$root/.venv/bin/python}"
export EVOFORGE_PROJECT_ROOT="${EVOFORGE_PROJECT_ROOT:-$root}"   # where the deployments' pull step runs flows from
exec "$python" -m evoforge worker "$@"
