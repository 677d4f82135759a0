#!/usr/bin/env bash
# The optional Ray extra, in its own environment: the CPU torch wheel plus cliplens with the ray
# and test extras (ray[data] brings pyarrow), then the tests marked ray. They start a local Ray
# cluster (2 CPUs) themselves; nothing outside the machine is needed.
#
# Usage: .ci/test-ray.sh [REPO_ROOT]   (default: the repository holding this script)
set -euo pipefail
root=${1:-"$(cd "$(dirname "$0")/.." && pwd)"}
cd "$root"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# a scratch environment outside the checkout, removed on exit; RAY_ENV=DIR keeps it at DIR
source "$root/.ci/scratch-env.sh"
scratch_env RAY_ENV
"$env_dir/bin/pip" install -q torch==2.13.0 -e ".[ray,test]"
"$env_dir/bin/python" -c "import ray, pyarrow; print('ray', ray.__version__, 'pyarrow', pyarrow.__version__)"
"$env_dir/bin/python" -m pytest -m ray -q -p no:cacheprovider
