#!/usr/bin/env bash
# Set up and run vproxy's whole test suite on a Debian or Ubuntu machine.
#
#   scripts/test.sh [PYTEST ARGS...]       e.g. scripts/test.sh -k bench -x
#
# Needs python3 (3.9+) and root or sudo. Idempotent; the second run only runs the tests.
#   1. installs the Debian packages the tests use, if any is missing (apt-get);
#   2. makes a virtual environment in .venv and installs the project with its test
#      extras into it (`pip install -e '.[test]'`), again only when pyproject.toml changed;
#   3. runs pytest in it with your arguments, and exits with pytest's status.
#
# Environment: PYTHON (default python3) makes the venv; VPROXY_TEST_CACHE (default
# ~/.cache/vproxy-tests) is where tests cache the Debian roots, wheels and guests.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv

say() { printf 'test.sh: %s\n' "$*" >&2; }

# --- 1. Debian packages -----------------------------------------------------------------
PACKAGES=(
    qemu-system-x86 qemu-utils        # real VMs for the QEMU channel tests
    debootstrap debian-archive-keyring  # the Debian 11/12/13 "bare host" roots
    qemu-user-static binfmt-support   # the arm64 Debian roots, run through qemu-user
    mandoc                            # man page lint
    busybox-static cpio               # the Linux test guest's initramfs
    stunnel4 openssh-server openssh-client  # the baselines bench/ compares against
)

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    say "not root and no sudo: cannot install Debian packages"
    exit 1
fi

if command -v dpkg-query >/dev/null 2>&1; then
    missing=()
    for pkg in "${PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$pkg")
        fi
    done
    if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 && [ ! -x "$VENV/bin/python" ]; then
        missing+=(python3-venv)  # Debian ships ensurepip separately
    fi
    # Tests fetch Debian's kernel with `apt-get download`: they need fresh package lists.
    lists_fresh=$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -n 1)
    if [ "${#missing[@]}" -gt 0 ] || [ -z "$lists_fresh" ]; then
        say "apt-get update"
        "${SUDO[@]}" apt-get update -qq -o Acquire::Retries=3
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing ${missing[*]}"
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends -o Acquire::Retries=3 "${missing[@]}" >/dev/null
    fi
else
    say "no dpkg here: install by hand what these need: ${PACKAGES[*]}"
fi

# --- 2. the virtual environment -----------------------------------------------------------
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c pass >/dev/null 2>&1; then
    say "$VENV is broken (its Python is gone?): making it again"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
[ -f "$VENV/.gitignore" ] || echo '*' > "$VENV/.gitignore"  # keep it out of git status

stamp="$VENV/.vproxy-installed"
want="$("$VENV/bin/python" --version 2>&1) $("$VENV/bin/python" -c \
    'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())' < pyproject.toml)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "pip install -e '.[test]' into $VENV (log: $VENV/pip.log)"
    : > "$VENV/pip.log"
    # An editable install from pyproject.toml alone needs pip 21.3+ (Debian 11 has 20.3).
    if ! "$VENV/bin/python" -c 'import pip, sys; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (21, 3))' 2>/dev/null; then
        "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off \
            --upgrade 'pip>=21.3' >> "$VENV/pip.log" 2>&1 || { tail -n 40 "$VENV/pip.log" >&2; exit 1; }
    fi
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off \
            -e '.[test]' >> "$VENV/pip.log" 2>&1; then
        tail -n 40 "$VENV/pip.log" >&2
        say "pip install failed"
        exit 1
    fi
    echo "$want" > "$stamp"
fi

# --- 3. the tests -------------------------------------------------------------------------
args=(-q)
if [ -n "${CI:-}" ]; then
    args+=(--durations=25)  # CI has a time limit: show where the time goes
fi
say "python -m pytest ${args[*]} $*"
exec "$VENV/bin/python" -m pytest "${args[@]}" "$@"
