#!/usr/bin/env bash
# Once per Prefect server, and again after editing deploy/prefect.yaml: deploy/cluster/setup.sh [prefect deploy options]
#
# Creates the process work pools gpu and cpu (existing ones are kept as they are), then deploys
# deploy/prefect.yaml: every deployment, or those named (`--name gpu --name cpu`: the stage deployments;
# prefect matches `--name` against the names in the file, or `FUNCTION/NAME` such as `stage_flow/gpu`).
# Needs PREFECT_API_URL=http://SERVER:4200/api in the environment; run it from any machine with the checkout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${EVOFORGE_PYTHON:-$root/.venv/bin/python}"
export EVOFORGE_PROJECT_ROOT="${EVOFORGE_PROJECT_ROOT:-$root}"
cd "$root"
exec "$python" -m evoforge pools setup "$@"
