#!/usr/bin/env bash
# The test command: installs everything the tests need on a fresh machine, then runs pytest.
#   ./scripts/test.sh            # the whole suite (soak tests in their bounded form)
#   ./scripts/test.sh -k crash   # extra arguments go to pytest
# PACS_NODE_SOAK=1 runs the long soak tests in full.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: DCMTK, real third-party DICOM peers (storescu, echoscu, storescp, ...);
# fuse3, fusermount3 and libfuse3 for the power-loss filesystem (tests/powerfs.py); strace;
# chromium, driven by Playwright (never `playwright install`) for the web page test.
MISSING=()
if ! [ -x /usr/bin/storescu ] || ! [ -x /usr/bin/storescp ]; then
    MISSING+=(dcmtk)
fi
if ! [ -x /usr/bin/fusermount3 ] || ! /sbin/ldconfig -p | grep 'libfuse3\.so' >/dev/null; then
    MISSING+=(fuse3)
fi
if ! [ -x /usr/bin/strace ]; then  # the second witness of the fsync order
    MISSING+=(strace)
fi
if ! [ -x /usr/bin/chromium ]; then  # the browser of tests/test_web_browser.py (Playwright)
    MISSING+=(chromium)
fi
if [ "${#MISSING[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y "${MISSING[@]}"
fi

# A private virtual environment with the package and its test extras.
PYTHON="${PYTHON:-python3}"
if ! [ -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"

.venv/bin/python -m ruff check pacs_node tests bench
exec .venv/bin/python -m pytest "$@"
