#!/bin/sh
# The web UI tests drive Debian's Chromium and its driver; `make test` runs this first so a fresh
# machine needs no manual step. Installs them with apt-get when missing (through sudo unless root),
# or says exactly why it cannot and how to run the other tests without them.
set -u
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
CHROMEDRIVER=${CHROMEDRIVER:-/usr/bin/chromedriver}
PACKAGES="chromium chromium-driver"
WITHOUT="or run every other test without them: make test BROWSER_TESTS=no"

installed() { [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; }

cannot() {
    echo "make test: the web UI tests need $CHROMIUM and $CHROMEDRIVER (Debian packages $PACKAGES)," \
        "and they cannot be installed here: $1. Install them yourself ($2), $WITHOUT" >&2
    exit 1
}

installed && exit 0
command -v apt-get >/dev/null || cannot "this system has no apt-get" "with your package manager"
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null; then
    SUDO="sudo"
else
    cannot "installing needs root, this user is not root and sudo is not installed" "as root: apt-get install $PACKAGES"
fi
echo "make test: installing $PACKAGES for the web UI tests (apt-get${SUDO:+ through sudo})" >&2
# sudo drops the caller's environment, so DEBIAN_FRONTEND goes through env.
$SUDO apt-get update -qq &&
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES ||
    cannot "apt-get failed (its message is above)" "${SUDO:+sudo }apt-get install $PACKAGES"
installed || cannot "apt-get installed $PACKAGES but $CHROMIUM or $CHROMEDRIVER is still missing" \
    "check where your distribution puts them"
