#!/bin/sh
# What the tests need from the system; `make test` runs this first so a fresh machine needs no manual
# step. Each argument is COMMAND=PACKAGE (a command name or an absolute path, and the Debian package
# that provides it). What is missing is installed with apt-get (through sudo unless root); when that
# cannot be done the script says exactly why and how to go on.
#   sh tests/system-deps.sh /usr/bin/chromium=chromium /usr/bin/chromedriver=chromium-driver
#   sh tests/system-deps.sh --optional systemd-analyze=systemd    # tests that need it skip without it
set -u
OPTIONAL=no
if [ "${1:-}" = --optional ]; then OPTIONAL=yes; shift; fi
WITHOUT=${WITHOUT:-"or run every other test without them: make test BROWSER_TESTS=no"}

present() { case "$1" in /*) [ -x "$1" ] ;; *) command -v "$1" >/dev/null 2>&1 ;; esac; }

missing() {  # the packages of the commands that are not there
    for pair in "$@"; do present "${pair%%=*}" || printf '%s ' "${pair#*=}"; done
}

PACKAGES=$(missing "$@")
[ -z "$PACKAGES" ] && exit 0

cannot() {
    if [ "$OPTIONAL" = yes ]; then
        echo "make test: $PACKAGES cannot be installed here ($1); the tests that need them will be skipped" >&2
        exit 0
    fi
    echo "make test: the tests need $PACKAGES (Debian packages), and they cannot be installed here: $1." \
        "Install them yourself ($2), $WITHOUT" >&2
    exit 1
}

command -v apt-get >/dev/null || cannot "this system has no apt-get" "with your package manager"
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null; then
    SUDO="sudo"
else
    cannot "installing needs root, this user is not root and sudo is not installed" "as root: apt-get install $PACKAGES"
fi
echo "make test: installing $PACKAGES for the tests (apt-get${SUDO:+ through sudo})" >&2
# sudo drops the caller's environment, so DEBIAN_FRONTEND goes through env.
$SUDO apt-get update -qq &&
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES ||
    cannot "apt-get failed (its message is above)" "${SUDO:+sudo }apt-get install $PACKAGES"
[ -z "$(missing "$@")" ] || cannot "apt-get installed $PACKAGES but $(missing "$@")is still missing" \
    "check where your distribution puts them"
