#!/usr/bin/env bash
# scripts/apt_install.sh WHO PACKAGE... - installs the Debian packages not installed yet
# (apt-get, no recommends), saying so as WHO; does nothing when all are there.
set -euo pipefail
who=$1; shift
missing=""
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
[ -n "$missing" ] || exit 0
echo "$who: installing Debian packages:$missing"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
