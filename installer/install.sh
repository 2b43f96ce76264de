#!/bin/sh
# install.sh: install the edge appliance from this bundle on a box with no network.
#
#   sudo ./install.sh [--prefix /opt/appliance] [--pubkey FILE] [--gpu] [--no-systemd] ...
#
# Order matters: the bundle is verified (signature, then every file's sha256) before anything is
# written outside a temporary folder; then the box is checked (architecture, Python, glibc, disk,
# compiler); only then is the venv created. Running it twice is harmless: an existing venv, the
# installed packages, the models and config.toml are kept or replaced by identical copies.
#
# Each build gets its own venv, PREFIX/venvs/VERSION-ID (ID: the start of SHA256SUMS' hash), and
# PREFIX/venv is a symlink to the one in use (venvs cannot be moved: their scripts name their own
# path). --upgrade installs the new build beside the old one, starts it on a spare port with a
# scratch data folder and switches the symlink only once that answers /readyz; under systemd it
# then restarts the unit and switches back if the service does not become ready.
#
# The signature is checked with the box's own openssl (3.0 or newer: Ed25519 with -rawin), never
# with code from the bundle: a verifier shipped inside the bundle it verifies proves nothing.
set -eu

BUNDLE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/appliance
DATA=""
PUBKEY=""
DEFAULT_PUBKEY=/etc/appliance/bundle-signing.pub   # a site may keep its builder's key here
PYTHON=""
GPU=""   # default: what the bundle was built for (appliance bundle --gpu)
CUDA_ARCH=""
SYSTEMD=yes
PORT=8080
VERIFY_ONLY=no
BUILD_LLAMA=auto
UNIT_ONLY=""
UPGRADE=no
UNINSTALL=no
PURGE=no
SERVICE_USER=appliance
UNIT=/etc/systemd/system/appliance.service

usage() {
    cat <<EOF
usage: $0 [options]

  --prefix DIR       install under DIR (DIR/venv links to the build in use) [/opt/appliance]
  --data DIR         data folder: config.toml, logs.db, models [PREFIX/data]
  --pubkey FILE      Ed25519 public key (PEM) the bundle must be signed with
                     [$DEFAULT_PUBKEY if it exists]
  --python PATH      Python interpreter to build the venv from [python<version of the bundle>]
  --gpu              build llama.cpp with CUDA (-DGGML_CUDA=on); Jetson Orin is detected (arch 87)
                     [on for a bundle built with --gpu]
  --cuda-arch N      CUDA architecture for --gpu [87 on Jetson Orin, else native]
  --build-llama      compile llama-cpp-python from the bundled source even if a prebuilt wheel fits
  --port N           port written to a new config.toml [8080]
  --no-systemd       no system user, no unit: for containers and tests
  --verify-only      check the bundle and the box, install nothing
  --write-unit FILE  write the systemd unit for these options to FILE and stop
  --upgrade          replace another build in PREFIX (data and config kept; rolled back if not ready)
  --uninstall        remove the unit, the venvs and this script's copy; the data folder stays
  --purge            with --uninstall: remove the data folder (logs, keys, models) and the user too
  -h, --help         this text
EOF
}

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=${2:?--prefix needs a folder}; shift ;;
        --data) DATA=${2:?--data needs a folder}; shift ;;
        --pubkey) PUBKEY=${2:?--pubkey needs a file}; shift ;;
        --python) PYTHON=${2:?--python needs a path}; shift ;;
        --gpu) GPU=yes ;;
        --cuda-arch) CUDA_ARCH=${2:?--cuda-arch needs a number}; shift ;;
        --build-llama) BUILD_LLAMA=yes ;;
        --port) PORT=${2:?--port needs a number}; shift ;;
        --no-systemd) SYSTEMD=no ;;
        --verify-only) VERIFY_ONLY=yes ;;
        --write-unit) UNIT_ONLY=${2:?--write-unit needs a file}; shift ;;
        --upgrade) UPGRADE=yes ;;
        --uninstall) UNINSTALL=yes ;;
        --purge) PURGE=yes ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
    shift
done
case "$PREFIX" in /*) ;; *) PREFIX=$(pwd)/$PREFIX ;; esac
DATA=${DATA:-$PREFIX/data}
case "$DATA" in /*) ;; *) DATA=$(pwd)/$DATA ;; esac
VENV=$PREFIX/venv

# --- the systemd unit --------------------------------------------------------------------------
write_unit() {
    # The service never needs root: the power profiles report what they could not do.
    # No PrivateDevices: a Jetson's GPU is reached through /dev/nvhost-* and /dev/nvmap.
    cat > "$1" <<EOF
[Unit]
Description=Edge appliance: OpenAI-compatible local model server
After=network.target

[Service]
Type=simple
User=$SERVICE_USER
Group=$SERVICE_USER
Environment=APPLIANCE_HOME=$DATA
ExecStart=$VENV/bin/appliance serve
Restart=on-failure
RestartSec=5
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths=$DATA
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
LockPersonality=yes
CapabilityBoundingSet=

[Install]
WantedBy=multi-user.target
EOF
}

if [ -n "$UNIT_ONLY" ]; then
    write_unit "$UNIT_ONLY"
    say "wrote $UNIT_ONLY"
    exit 0
fi

# --- uninstall: needs no bundle (PREFIX keeps a copy of this script) ----------------------------
if [ "$UNINSTALL" = yes ]; then
    if [ -f "$UNIT" ] && command -v systemctl >/dev/null 2>&1; then
        say "stopping and removing appliance.service"
        systemctl disable --now appliance.service >/dev/null 2>&1 || true
        rm -f "$UNIT"
        systemctl daemon-reload || true
    fi
    rm -rf "$PREFIX/venvs" "$PREFIX/venv" "$PREFIX/bundle-manifest.json" "$PREFIX/install.sh"
    if [ "$PURGE" = yes ]; then
        say "removing the data folder $DATA"
        rm -rf "$DATA"
        if id -u "$SERVICE_USER" >/dev/null 2>&1; then userdel "$SERVICE_USER" || true; fi
    else
        say "kept the data folder $DATA (logs, keys, models; --purge removes it)"
    fi
    rmdir "$PREFIX" 2>/dev/null || true
    say "uninstalled from $PREFIX"
    exit 0
fi

# --- 1. the bundle: signature, then every file -------------------------------------------------
verify_signature() {
    key=$PUBKEY
    if [ -z "$key" ] && [ -f "$DEFAULT_PUBKEY" ]; then key=$DEFAULT_PUBKEY; fi
    if [ -z "$key" ]; then
        if [ -f "$BUNDLE/SHA256SUMS.sig" ]; then
            say "the bundle is signed, but no --pubkey was given: checking integrity only, not who built it"
        fi
        return 0
    fi
    [ -f "$key" ] || die "public key $key not found"
    [ -f "$BUNDLE/SHA256SUMS.sig" ] || die "a public key was given but the bundle is not signed (no SHA256SUMS.sig): refusing"
    command -v openssl >/dev/null 2>&1 || die "checking the signature needs openssl (3.0 or newer); install it or leave out --pubkey"
    fingerprint=$(openssl pkey -pubin -in "$key" -outform DER 2>/dev/null | tail -c 32 | sha256sum | cut -d' ' -f1)
    if ! openssl pkeyutl -verify -pubin -inkey "$key" -rawin -in "$BUNDLE/SHA256SUMS" \
            -sigfile "$BUNDLE/SHA256SUMS.sig" >/dev/null 2>&1; then
        die "SHA256SUMS is not signed by the key $key (sha256 $fingerprint): the bundle was altered or comes from someone else; nothing was installed"
    fi
    say "signature ok: signed by the key with sha256 $fingerprint"
}

verify_files() {
    [ -f "$BUNDLE/SHA256SUMS" ] || die "$BUNDLE/SHA256SUMS is missing: not a complete bundle"
    command -v sha256sum >/dev/null 2>&1 || die "sha256sum (coreutils) is needed to check the bundle"
    if ! report=$(cd "$BUNDLE" && sha256sum -c --strict --quiet SHA256SUMS 2>&1); then
        die "the bundle does not match SHA256SUMS, nothing was installed:
$report"
    fi
    # A file that SHA256SUMS does not list was added on the way: refuse it too.
    listed=$(mktemp); present=$(mktemp)
    sed 's/^[0-9a-f]*  //' "$BUNDLE/SHA256SUMS" | sort > "$listed"
    (cd "$BUNDLE" && find . -type f ! -name SHA256SUMS ! -name SHA256SUMS.sig | sed 's|^\./||' | sort) > "$present"
    extra=$(comm -13 "$listed" "$present"); rm -f "$listed" "$present"
    [ -z "$extra" ] || die "files not listed in SHA256SUMS (added to the bundle?), nothing was installed:
$extra"
    say "every file matches SHA256SUMS ($(wc -l < "$BUNDLE/SHA256SUMS") files)"
}

verify_signature
verify_files
# Safe to read now: it is one of the files just checked.
. "$BUNDLE/bundle.env"
GPU=${GPU:-$BUNDLE_GPU}

# --- 2. the box --------------------------------------------------------------------------------
machine=$(uname -m)
[ "$machine" = "$BUNDLE_ARCH" ] || die "this bundle is for $BUNDLE_ARCH, this box is $machine: build one with appliance bundle --platform linux_$machine"

PYTHON=${PYTHON:-$(command -v "python$BUNDLE_PYTHON" || command -v python3 || true)}
[ -n "$PYTHON" ] || die "no python$BUNDLE_PYTHON found: install Python $BUNDLE_PYTHON or pass --python PATH"
have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$have" = "$BUNDLE_PYTHON" ] || die "$PYTHON is Python $have, the bundle's wheels are for $BUNDLE_PYTHON: pass --python PATH or build a bundle with --python $have"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || die "$PYTHON cannot create virtual environments: install python$BUNDLE_PYTHON-venv"
glibc=$("$PYTHON" -c 'import platform; print(platform.libc_ver()[1] or "0")')
"$PYTHON" -c "import sys; sys.exit(tuple(map(int, '$glibc'.split('.'))) < tuple(map(int, '$BUNDLE_GLIBC'.split('.'))))" ||
    say "warning: glibc $glibc is older than $BUNDLE_GLIBC, the newest the bundle's wheels may need"

# The venv takes about twice the wheels' size once unpacked; models are copied; leave 200 MB spare.
need_kb=$(( $(du -sk "$BUNDLE" | cut -f1) * 3 + 200000 ))
probe=$PREFIX; while [ ! -d "$probe" ]; do probe=$(dirname "$probe"); done
free_kb=$(df -Pk "$probe" | awk 'NR == 2 {print $4}')
[ "$free_kb" -ge "$need_kb" ] || die "not enough disk under $probe: $((free_kb / 1024)) MB free, $((need_kb / 1024)) MB needed"

# llama.cpp's CPU flags, as the Makefile's LLAMA_CMAKE_ARGS (why each one: see the Makefile).
CMAKE_FLAGS="-DGGML_OPENMP=OFF"
if [ "$machine" = x86_64 ]; then
    CMAKE_FLAGS="$CMAKE_FLAGS -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
fi
if [ "$GPU" = yes ]; then
    if [ -z "$CUDA_ARCH" ]; then
        # Jetson Orin (AGX, NX, Nano) is compute capability 8.7; elsewhere let CMake ask the GPU.
        if grep -qi orin /proc/device-tree/model 2>/dev/null; then CUDA_ARCH=87; else CUDA_ARCH=native; fi
    fi
    # --exclude-libs: a static libstdc++ stays private to each library (why: the Makefile's LLAMA_EXCLUDE_STATIC_CXX).
    CMAKE_FLAGS="$CMAKE_FLAGS -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH"
    CMAKE_FLAGS="$CMAKE_FLAGS -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,libstdc++.a"
    [ -d /usr/local/cuda/bin ] && PATH=/usr/local/cuda/bin:$PATH
    command -v nvcc >/dev/null 2>&1 || die "--gpu needs CUDA's nvcc (JetPack: /usr/local/cuda/bin/nvcc)"
fi

llama_wheel=""
if [ "$BUILD_LLAMA" = auto ] && [ "$GPU" = no ] && [ -n "$LLAMA_PREBUILT" ]; then
    # Built on a box of this architecture with the same CPU flags: it fits this one.
    case "$LLAMA_PREBUILT" in *"$machine"*) llama_wheel=$BUNDLE/$LLAMA_PREBUILT ;; esac
fi
if [ -z "$llama_wheel" ]; then
    command -v cc >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 ||
        die "llama-cpp-python is built here from source and needs a C and C++ compiler (Debian/Ubuntu: apt install build-essential)"
fi

if [ "$VERIFY_ONLY" = yes ]; then
    say "bundle and box ok (verify only: nothing installed)"
    exit 0
fi

# --- 3. the venv and the packages, from the bundle only ----------------------------------------
# pip must see nothing but the bundle: no index, no site config, no PIP_* from the environment.
for var in $(env | sed -n 's/^\(PIP_[A-Z_]*\)=.*/\1/p'); do unset "$var"; done
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_FIND_LINKS="$BUNDLE/wheels" PIP_DISABLE_PIP_VERSION_CHECK=1

BUILD_ID=$BUNDLE_VERSION-$(sha256sum "$BUNDLE/SHA256SUMS" | cut -c1-12)
NEW=$PREFIX/venvs/$BUILD_ID
if [ -e "$VENV" ] && [ ! -L "$VENV" ]; then die "$VENV exists and is not this installer's link: move it away first"; fi
current=$(readlink "$VENV" 2>/dev/null || true)   # venvs/ID of the build in use, or empty
if [ -n "$current" ] && [ "$current" != "venvs/$BUILD_ID" ] && [ "$UPGRADE" = no ]; then
    die "$PREFIX holds another build (${current#venvs/}); run with --upgrade to replace it (data and config are kept)"
fi
[ "$UPGRADE" = no ] || [ -n "$current" ] || die "nothing installed in $PREFIX to upgrade: run without --upgrade"

mkdir -p "$PREFIX/venvs" "$DATA/models"
if [ -x "$NEW/bin/python" ] && [ "$("$NEW/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$BUNDLE_PYTHON" ]; then
    say "keeping the venv $NEW"
else
    say "creating the venv $NEW"
    rm -rf "$NEW"
    "$PYTHON" -m venv "$NEW"
fi
say "installing the service from the bundle's wheels"
"$NEW/bin/python" -m pip install --quiet -r "$BUNDLE/requirements.txt"

installed_llama=$("$NEW/bin/python" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)
if [ "$installed_llama" = "$LLAMA_VERSION" ] && [ "$BUILD_LLAMA" = auto ]; then
    say "llama-cpp-python $LLAMA_VERSION is already installed"
elif [ -n "$llama_wheel" ]; then
    say "installing llama-cpp-python $LLAMA_VERSION (prebuilt wheel)"
    "$NEW/bin/python" -m pip install --quiet --force-reinstall --no-deps "$llama_wheel"
    "$NEW/bin/python" -m pip install --quiet "$llama_wheel"
else
    jobs=$(nproc 2>/dev/null || echo 2)
    say "building llama-cpp-python $LLAMA_VERSION from source ($CMAKE_FLAGS), a few minutes on $jobs cores"
    CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=$jobs \
        "$NEW/bin/python" -m pip install --quiet --force-reinstall --no-cache-dir "$BUNDLE/$LLAMA_SDIST"
fi

# --- 4. models and config ----------------------------------------------------------------------
for model in $MODELS; do
    dest=$DATA/models/$model
    if [ -f "$dest/manifest.json" ] && cmp -s "$BUNDLE/models/$model/manifest.json" "$dest/manifest.json"; then
        say "model $model is already installed"
    else
        say "installing model $model into $dest"
        rm -rf "$dest.new"
        cp -R "$BUNDLE/models/$model" "$dest.new"
        rm -rf "$dest"
        mv "$dest.new" "$dest"
    fi
    # Every file checked against the package's manifest; registered so it can be served by name.
    if [ "$model" != "$DEFAULT_MODEL" ]; then
        APPLIANCE_HOME=$DATA "$NEW/bin/appliance" models add "$dest" >/dev/null
    else
        "$NEW/bin/python" -c 'import sys; from models.manifest import load_verified; load_verified(sys.argv[1])' "$dest"
    fi
done

if [ -f "$DATA/config.toml" ]; then
    say "keeping $DATA/config.toml"
else
    say "writing $DATA/config.toml"
    cat > "$DATA/config.toml" <<EOF
# Written by install.sh; every setting is described in the README's configuration table.
host = "127.0.0.1"
port = $PORT
# The default model is served from its package folder (its files are checked at every load).
model = "$DATA/models/$DEFAULT_MODEL"
EOF
fi

# --- 5. switch to the new build ----------------------------------------------------------------
wait_ready() {  # URL SECONDS [PID]: until URL answers 200 (over HTTP, or HTTPS when tls_cert is set), the time runs out or PID ends
    "$NEW/bin/python" - "$@" <<'EOF'
import os, ssl, sys, time, urllib.request
url, deadline, pid = sys.argv[1], time.time() + float(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0
# Only this box's own service on loopback is asked, and only whether it is ready: its certificate, which may
# name the box's LAN names only, is not what this checks.
loopback_tls = ssl.create_default_context()
loopback_tls.check_hostname, loopback_tls.verify_mode = False, ssl.CERT_NONE
while time.time() < deadline:
    for attempt in (url, url.replace("http://", "https://", 1)):
        try:
            with urllib.request.urlopen(attempt, timeout=5, context=loopback_tls) as r:
                if r.status == 200:
                    sys.exit(0)
        except OSError:
            pass
    if pid:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(1)
    time.sleep(1)
sys.exit(1)
EOF
}

probe() {  # start the new build on a spare port with copies of the config and the log, so the serving one is untouched
    scratch=$(mktemp -d)
    for f in config.toml models.json; do [ ! -f "$DATA/$f" ] || cp "$DATA/$f" "$scratch/"; done
    # A consistent copy of the log while the old build writes it (SQLite's backup API): the new build's
    # database migrations run on this site's own rows before anything is switched.
    [ ! -f "$DATA/logs.db" ] || "$NEW/bin/python" -c 'import sqlite3, sys
src, dst = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2])
src.backup(dst)' "$DATA/logs.db" "$scratch/logs.db"
    spare=$("$NEW/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$NEW/bin/appliance" serve --home "$scratch" --host 127.0.0.1 --port "$spare" > "$scratch/serve.log" 2>&1 &
    pid=$!
    ok=yes
    wait_ready "http://127.0.0.1:$spare/readyz" 180 "$pid" || ok=no
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    [ "$ok" = yes ] || tail -n 20 "$scratch/serve.log" >&2
    rm -rf "$scratch"
    [ "$ok" = yes ]
}

switch_to() {  # atomically point PREFIX/venv at venvs/ID
    ln -sfn "$1" "$PREFIX/venv.switch"
    mv -T "$PREFIX/venv.switch" "$VENV"
}

if [ "$current" = "venvs/$BUILD_ID" ]; then
    say "build $BUILD_ID is already the one in use"
else
    if [ -n "$current" ]; then
        say "upgrade: starting build $BUILD_ID on a spare port before switching"
        if ! probe; then
            rm -rf "$NEW"
            die "build $BUILD_ID did not become ready (its output is above): kept ${current#venvs/}, which goes on serving"
        fi
    fi
    switch_to "venvs/$BUILD_ID"
    say "build $BUILD_ID is now $VENV${current:+ (previous: ${current#venvs/})}"
    # Keep the new build and the one before it (still running until restarted, and a way back).
    for old in "$PREFIX"/venvs/*; do
        case "venvs/${old##*/}" in "venvs/$BUILD_ID"|"$current") ;; *) rm -rf "$old" ;; esac
    done
fi
cp "$BUNDLE/manifest.json" "$PREFIX/bundle-manifest.json"
cp "$BUNDLE/install.sh" "$PREFIX/install.sh"   # for --uninstall later, without the bundle

# --- 6. the service ----------------------------------------------------------------------------
if [ "$SYSTEMD" = no ]; then
    say "installed $BUNDLE_VERSION in $PREFIX (no systemd). Start it with:"
    printf '    APPLIANCE_HOME=%s %s/bin/appliance serve\n' "$DATA" "$VENV"
    exit 0
fi

[ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 || die "systemd is not running here: use --no-systemd and start the service yourself"
id -u "$SERVICE_USER" >/dev/null 2>&1 ||
    useradd --system --home-dir "$DATA" --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
chown -R "$SERVICE_USER:$SERVICE_USER" "$DATA"
write_unit "$UNIT"
systemctl daemon-reload
systemctl enable appliance.service >/dev/null
systemctl restart appliance.service
port=$(sed -n 's/^port *= *\([0-9]*\).*/\1/p' "$DATA/config.toml" | head -n 1)
url=http://127.0.0.1:${port:-8080}
say "waiting for $url/readyz"
if ! wait_ready "$url/readyz" 180; then
    if [ -n "$current" ] && [ "$current" != "venvs/$BUILD_ID" ]; then
        switch_to "$current"
        systemctl restart appliance.service
        die "build $BUILD_ID did not become ready under systemd: rolled back to ${current#venvs/} (journalctl -u appliance.service)"
    fi
    die "the service did not become ready within 180 s: journalctl -u appliance.service"
fi
say "the appliance is serving on $url (web UI: $url/, API: $url/v1)"
say "create the first admin key: sudo -u $SERVICE_USER APPLIANCE_HOME=$DATA $VENV/bin/appliance keys create --role admin"
