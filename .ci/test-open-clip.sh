#!/usr/bin/env bash
# The optional open_clip extra, in its own environment: open_clip imports torchvision, and there
# is no CPU torchvision wheel that matches the CPU torch the main environment uses (it fails at
# import and then breaks transformers in the same process). So this environment takes torch and
# torchvision from the registry as a matching pair (CUDA builds; they run on the CPU), then
# cliplens with the open_clip and test extras, and runs the tests marked open_clip.
#
# Usage: .ci/test-open-clip.sh [REPO_ROOT]   (default: the repository holding this script)
set -euo pipefail
root=${1:-"$(cd "$(dirname "$0")/.." && pwd)"}
cd "$root"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# a scratch environment outside the checkout (about 6 GB with the CUDA wheels), removed on exit;
# OPEN_CLIP_ENV=DIR keeps it at DIR instead (rebuilt from scratch each run)
source "$root/.ci/scratch-env.sh"
scratch_env OPEN_CLIP_ENV
"$env_dir/bin/pip" install -q torch torchvision
# the extra "open_clip" under its normalised name: older pips (23.2) do not normalise a request
# for "open_clip" and then silently install without it
"$env_dir/bin/pip" install -q -e ".[open-clip,test]"
# torch and torchvision must import together, or open_clip (and transformers) break at import
"$env_dir/bin/python" -c "import torch, torchvision, open_clip; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'open_clip', open_clip.__version__)"
"$env_dir/bin/python" -m pytest -m open_clip -q -p no:cacheprovider
