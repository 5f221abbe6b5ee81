#!/usr/bin/env bash
# End-to-end tests of the web monitor in headless Chromium: installs Debian's chromium
# when it is missing and playwright-core from the lockfile (never a downloaded browser),
# builds gantry, and runs monitor.test.mjs against `gantry serve` and `gantry sim`.
# Screenshots land in target/monitor-artifacts/.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x /usr/bin/chromium ]; then
    echo "== installing Debian's chromium"
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
npm ci --no-audit --no-fund --loglevel=error
(cd .. && cargo build -q -p gantry)
npm test
