#!/usr/bin/env bash
# The optional web app (`cliplens app`), in its own environment: the app extra (starlette,
# uvicorn, python-multipart), httpx for Starlette's test client, selenium for the browser test,
# and a headless Chromium with its driver from Debian (installed only when missing). Runs the
# tests marked app: the endpoints through the test client, then the page in a real browser.
#
# Usage: .ci/test-app.sh [REPO_ROOT]   (default: the repository holding this script)
set -euo pipefail
root=${1:-"$(cd "$(dirname "$0")/.." && pwd)"}
cd "$root"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# a scratch environment outside the checkout, removed on exit; APP_ENV=DIR keeps it at DIR instead
source "$root/.ci/scratch-env.sh"
scratch_env APP_ENV
"$env_dir/bin/pip" install -q torch==2.13.0 -e ".[app,test]" httpx selenium

if ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  sudo_=""
  [ "$(id -u)" -ne 0 ] && sudo_="sudo"
  $sudo_ apt-get update -q
  $sudo_ apt-get install -y -q chromium chromium-driver
fi

# the browser test saves its screenshots under pytest's tmp folder (printed with -s)
"$env_dir/bin/python" -m pytest -m app -q -p no:cacheprovider
