#!/usr/bin/env bash
# Install what the browser test (tests/test_browser.py) needs, and nothing at test time:
#   - Debian's chromium at /usr/bin/chromium (apt; Playwright's own browser download is
#     never used: `playwright install` fetches builds from outside the package registries);
#   - jupyterlab and playwright (the Python package only) into the project's venv.
# Idempotent: does nothing when everything is already there.
# Usage: scripts/install-browser.sh [PIP]   (PIP defaults to .venv/bin/pip)
set -euo pipefail

PIP="${1:-.venv/bin/pip}"
CHROMIUM=/usr/bin/chromium

if [[ ! -x "$CHROMIUM" ]]; then
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "install-browser: $CHROMIUM is missing and we are not root." >&2
        echo "install-browser: run 'sudo apt-get install -y chromium' (Debian) and retry." >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Update the package lists only if apt does not know the package yet.
    policy="$(apt-cache policy chromium 2>/dev/null || true)"
    if ! grep -q 'Candidate: [0-9]' <<<"$policy"; then
        apt-get update -qq
    fi
    if ! apt-get install -y chromium; then
        # Stale lists (a version that the mirror no longer serves): refresh once, retry.
        apt-get update -qq
        apt-get install -y chromium
    fi
    echo "install-browser: installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
fi

# The python next to pip decides what "importable" means (the venv's interpreter).
PY="$(dirname "$PIP")/python"
if [[ ! -x "$PY" ]]; then
    PY=python3
fi

if ! "$PY" -c "import jupyterlab" >/dev/null 2>&1; then
    "$PIP" install "jupyterlab>=4.2,<5"
fi
if ! "$PY" -c "import playwright" >/dev/null 2>&1; then
    "$PIP" install "playwright>=1.45"
fi
