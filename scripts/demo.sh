#!/usr/bin/env bash
# See vproxy work on this machine: `vproxy demo` makes a throwaway CA, a tiny VM and an
# agent, shows the VM's console and screen through the mutual-TLS tunnel, and removes it
# all again. This script first installs what the demo needs when it is missing: QEMU
# (apt-get, with sudo unless root) and the Python packages (in .venv).
#
#   scripts/demo.sh [DEMO OPTIONS...]     e.g. scripts/demo.sh --keep-running
#
# The screenshot lands in the directory you run this from (vproxy-demo.png) unless you
# give --screenshot FILE.
set -euo pipefail
here=$(pwd)
cd "$(dirname "$0")/.."

say() { printf 'demo.sh: %s\n' "$*" >&2; }

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=(); elif command -v sudo >/dev/null 2>&1; then SUDO=(sudo); else
        say "QEMU is missing and there is no sudo: install the package qemu-system-x86"; exit 1
    fi
    say "installing QEMU (qemu-system-x86)"
    "${SUDO[@]}" apt-get update -qq -o Acquire::Retries=3
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o Acquire::Retries=3 qemu-system-x86 >/dev/null
fi

if python3 -c 'import cryptography, click, qemu.qmp' 2>/dev/null; then
    PY=python3
else
    if [ ! -x .venv/bin/python ]; then
        say "making .venv for the Python packages"
        python3 -m venv .venv 2>/dev/null || { sudo apt-get install -y -qq python3-venv >/dev/null && python3 -m venv .venv; }
    fi
    if ! .venv/bin/python -c 'import cryptography, click, qemu.qmp, vproxy' 2>/dev/null; then
        say "installing vproxy and cryptography into .venv"
        .venv/bin/pip install -q -e '.[pki]'
    fi
    PY=.venv/bin/python
fi

args=("$@")
case " ${args[*]-} " in
    *" --screenshot"*) ;;
    *) args+=(--screenshot "$here/vproxy-demo.png") ;;
esac
exec "$PY" -m vproxy demo "${args[@]}"
