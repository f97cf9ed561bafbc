#!/usr/bin/env bash
# Installs what the end-to-end browser test (tests/test_browser.py) needs, idempotently:
#   - Chromium from Debian (apt) if /usr/bin/chromium is missing;
#   - playwright-core (version pinned in tests/browser/package.json) from npm into
#     tests/browser/node_modules if it is missing.
# Playwright's own browser download is never used: the driver points at /usr/bin/chromium.
# Exit status: 0 when both are there; 3 when a registry could not be reached (the test skips
# with the message printed here); anything else is a real failure.
# One install at a time: pytest's workers each run the browser tests' set-up, and two apt-gets at
# once make the second fail on dpkg's lock (on a fresh machine that skipped a browser test).
# AEPO_CHROMIUM and AEPO_BROWSER_DIR name other places (tests/test_browser.py's check of the lock).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
browser_dir="${AEPO_BROWSER_DIR:-$here/tests/browser}"
chromium="${AEPO_CHROMIUM:-/usr/bin/chromium}"

if command -v flock >/dev/null; then
    exec 9>"${TMPDIR:-/tmp}/aepo-install-browser.lock"
    flock 9  # held until this script exits
fi

if [ ! -x "$chromium" ]; then
    if ! command -v apt-get >/dev/null; then
        echo "install_browser: $chromium is missing and apt-get is not available" >&2; exit 3
    fi
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "install_browser: installing chromium from Debian (apt-get)" >&2
    apt=($sudo apt-get -o DPkg::Lock::Timeout=300)  # wait for another apt (the system's own) rather than fail
    if ! { "${apt[@]}" update -qq && DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq chromium >/dev/null; }; then
        echo "install_browser: apt-get could not install chromium (no network or no apt access)" >&2; exit 3
    fi
fi

if [ ! -f "$browser_dir/node_modules/playwright-core/package.json" ]; then
    if ! command -v npm >/dev/null; then
        echo "install_browser: npm is not installed (needed for playwright-core)" >&2; exit 3
    fi
    echo "install_browser: installing playwright-core from npm into tests/browser/node_modules" >&2
    if ! (cd "$browser_dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --loglevel=error >&2); then
        echo "install_browser: npm install playwright-core failed (registry unreachable?)" >&2; exit 3
    fi
fi
echo "install_browser: ok ($("$chromium" --version 2>/dev/null || echo chromium), playwright-core $(node -p "require('$browser_dir/node_modules/playwright-core/package.json').version"))" >&2
