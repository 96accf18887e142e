#!/usr/bin/env bash
# The main job, end to end on this machine: a throwaway CA, an agent, and
# `vproxy bench` through the mutual-TLS tunnel against it. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import cryptography' 2>/dev/null || ! python3 -c 'import click, qemu.qmp' 2>/dev/null; then
    [ -d .venv ] || python3 -m venv .venv || { sudo apt-get install -y python3-venv && python3 -m venv .venv; }
    .venv/bin/pip install -q -e '.[pki]'
    PY=.venv/bin/python
else
    PY=python3
fi
work=$(mktemp -d)
agent=""
trap '[ -n "$agent" ] && kill "$agent" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
export VPROXY_PKI_DIR="$work/pki"
run() { echo "+ vproxy $*" >&2; "$PY" -m vproxy "$@"; }
run pki init >/dev/null
run pki issue server localhost --dns localhost --ip 127.0.0.1 >/dev/null
run pki issue client alice >/dev/null
"$PY" -m vproxy serve --identity localhost --listen 127.0.0.1:0 2>"$work/agent.log" &
agent=$!
for _ in $(seq 50); do grep -q "listening on" "$work/agent.log" && break; sleep 0.1; done
address=$(sed -n 's/.*listening on //p' "$work/agent.log" | head -1)
run bench "$address" --identity alice --seconds 1
