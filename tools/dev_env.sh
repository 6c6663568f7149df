#!/usr/bin/env bash
# The development environment behind `make demo` and `make test`: a virtual environment
# (default .venv, or $VENV) in which the README's install block runs as written: a CPU torch,
# ninja, and one editable install of the package with its test extra (one compile of
# stablekernels._C). `make` runs this only when the environment is missing or the build
# inputs changed; the object files are kept in build/objects, so a rebuild compiles only
# what changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${VENV:-.venv}"
started=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
  echo "make: creating $venv (a CPU torch and an editable build of stablekernels; minutes, once)"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
export STABLEKERNELS_BUILD_TEMP="${STABLEKERNELS_BUILD_TEMP:-$PWD/build/objects}"
install_block=$(tools/readme_block.sh install)
printf 'make: running the README install block in %s:\n%s\n' "$venv" "$install_block"
eval "$install_block"
python - <<'PY'
import torch
import stablekernels as sk
status = sk.backends.BACKENDS["cpp"].status()
assert "cpp" in sk.available_backends(), "the extension did not build: " + status
print(f"make: environment ready: torch {torch.__version__}, backends {sk.available_backends()}")
PY
echo "make: environment built in $(($(date +%s) - started)) s"
