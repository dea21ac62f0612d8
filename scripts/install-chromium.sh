#!/usr/bin/env bash
# Installs Debian's `chromium` for the dashboard's browser test (tests/watch.rs), only when
# /usr/bin/chromium is missing: seconds when it is there. Needs root (CI's machine runs as
# root) and Debian's package archive; elsewhere, install chromium yourself.
set -euo pipefail

if [[ -x /usr/bin/chromium ]]; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "install-chromium: /usr/bin/chromium is missing; run this as root or install Debian's chromium package" >&2
    exit 1
fi
echo "install-chromium: installing Debian's chromium package (once)..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
/usr/bin/chromium --version
