#!/usr/bin/env bash
# The built wheel on its own: install it with the named torch into a clean venv outside the
# checkout and run the README quick start there.
# usage: .ci/wheel_check.sh dist/ema_optim-X-py3-none-any.whl "torch==2.13.0"
set -euo pipefail
wheel=$(realpath "$1")
torch_pin=$2
here=$(realpath "$(dirname "$0")")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"${PYTHON:-python3}" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$torch_pin"
"$work/venv/bin/python" -m pip install -q "$wheel" "$torch_pin"
cd "$work"  # not the checkout: `import ema_optim` must find the installed wheel
"$work/venv/bin/python" "$here/quickstart.py" "$here/../README.md"
