#!/usr/bin/env bash
# Make sure Debian's headless-capable Chromium (/usr/bin/chromium) is installed.
# Never fails the caller: always exits 0 and prints exactly one line saying what happened.
# Used by tests/test_browser_report.py (once per pytest session) and usable by hand.
set -u

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
    echo "ensure_chromium: present: $CHROMIUM"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: FAILED: $CHROMIUM missing and apt-get not available (not a Debian/Ubuntu system)"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    SUDO="sudo -n"
else
    echo "ensure_chromium: FAILED: $CHROMIUM missing, not root and no password-less sudo to run apt-get"
    exit 0
fi

LOG="$(mktemp -t ensure_chromium.XXXXXX.log 2>/dev/null || echo /tmp/ensure_chromium.log)"
export DEBIAN_FRONTEND=noninteractive
start=$(date +%s)

try_install() {
    $SUDO apt-get install -y --no-install-recommends chromium >>"$LOG" 2>&1
}

# Try straight away (package lists may be fresh); on failure refresh the lists and retry once.
if ! try_install; then
    $SUDO apt-get update >>"$LOG" 2>&1
    try_install
fi

elapsed=$(( $(date +%s) - start ))
if [ -x "$CHROMIUM" ]; then
    echo "ensure_chromium: installed $("$CHROMIUM" --version 2>/dev/null | head -n1) with apt-get in ${elapsed}s"
    rm -f "$LOG"
else
    reason="$(grep -E '^(E:|W:)' "$LOG" | tail -n1)"
    echo "ensure_chromium: FAILED: apt-get install chromium did not provide $CHROMIUM after ${elapsed}s: ${reason:-see $LOG}"
fi
exit 0
