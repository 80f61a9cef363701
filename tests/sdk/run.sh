#!/usr/bin/env bash
# Run the SDK end-to-end suites (official openai and anthropic Python SDKs) against the
# release binaries: everything under tests/sdk.
#
#   tests/sdk/run.sh [pytest args...]
#
# Env: MODELUX_VENV (default <repo>/target/sdk-venv), MODELUX_BIN_DIR (default <repo>/target/release).
# Does not build Rust: run `cargo build --release --bins` first.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin_dir="${MODELUX_BIN_DIR:-$repo/target/release}"
venv="${MODELUX_VENV:-$repo/target/sdk-venv}"

missing=0
for b in modelux mock-upstream; do
  if [[ ! -x "$bin_dir/$b" ]]; then
    echo "error: $bin_dir/$b not found or not executable." >&2
    missing=1
  fi
done
if [[ $missing -ne 0 ]]; then
  echo "Build the release binaries first (cargo build --release --bins) or set MODELUX_BIN_DIR." >&2
  exit 1
fi
export MODELUX_BIN_DIR="$bin_dir"

if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$repo/tests/sdk/requirements.txt"

cd "$repo"
export PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/sdk "$@"
