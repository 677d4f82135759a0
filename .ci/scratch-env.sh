# Sourced by the extras' CI scripts: `scratch_env NAME` makes a fresh virtual environment and
# sets env_dir to it: at $NAME when that variable is set (rebuilt from scratch each run, kept
# afterwards), else in a scratch folder outside the checkout that is removed on exit.
scratch_env() {
  local keep=${!1:-}
  if [ -n "$keep" ]; then
    env_dir=$keep
    rm -rf "$env_dir"
  else
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    env_dir=$scratch/venv
  fi
  python3 -m venv "$env_dir"
}
