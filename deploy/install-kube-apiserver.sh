#!/usr/bin/env bash
# Builds a real kube-apiserver (Kubernetes 1.20.2, from Debian bookworm's `kubernetes`
# source package, which vendors every dependency) offline and caches it in
# $HOME/.cache/ebpf-mesh/kube/kube-apiserver, and installs etcd next to it. The `tests`
# crate (tests/src/kube.rs) runs both for the end-to-end tests against a live API server.
#
# No registry reachable from CI ships a ready kube-apiserver binary, hence the build:
# about 7 minutes on 2 cores and 1.3 GB peak memory; the build tree is removed afterwards.
# Idempotent: with the binary cached it only makes sure etcd is installed.
#
# Runs as root (apt-get). See ../shared/notes/kube-apiserver.md for the recipe.
set -euo pipefail

CACHE="${HOME}/.cache/ebpf-mesh/kube"
BIN="${CACHE}/kube-apiserver"
BUILD="${CACHE}/build"
WANT_VERSION="v1.20"

start_all=$(date +%s)
step_start=$start_all
step() {
    local now
    now=$(date +%s)
    echo "==> [+$((now - start_all))s, previous step $((now - step_start))s] $*"
    step_start=$now
}

export DEBIAN_FRONTEND=noninteractive

# etcd-server / etcd-client: the API server's store (tests start it on a free port).
ensure_etcd() {
    if command -v etcd >/dev/null && command -v etcdctl >/dev/null && command -v openssl >/dev/null; then
        return 0
    fi
    step "installing etcd-server etcd-client openssl"
    if ! apt-get install -y --no-install-recommends etcd-server etcd-client openssl; then
        apt-get update
        apt-get install -y --no-install-recommends etcd-server etcd-client openssl
    fi
}

cached_version() {
    [[ -x "$BIN" ]] && "$BIN" --version 2>/dev/null | grep -o 'v[0-9][0-9.]*' | head -n1
}

if v=$(cached_version) && [[ "$v" == "$WANT_VERSION".* ]]; then
    ensure_etcd
    echo "kube-apiserver $v already at $BIN"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "error: run as root (apt-get install, apt-get source need it)" >&2
    exit 1
fi

# --- deb-src entry: a copy of bookworm's deb entry with Types: deb-src ---
step "checking for a bookworm deb-src entry"
have_src() {
    grep -rqsE '^\s*(Types:.*deb-src|deb-src\s)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}
if ! have_src; then
    src_file=/etc/apt/sources.list.d/ebpf-mesh-deb-src.sources
    entry=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        # The first deb822 stanza whose Suites list "bookworm" (not only -security/-updates).
        entry=$(awk -v RS= '
            /(^|\n)Types:[^\n]*deb/ && /(^|\n)Suites:([^\n]* )?bookworm( |\n|$)/ { print; exit }
        ' "$f")
        [[ -n "$entry" ]] && break
    done
    if [[ -n "$entry" ]]; then
        printf '%s\n' "$entry" | sed -E 's/^Types:.*/Types: deb-src/' >"$src_file"
        echo "wrote $src_file:"
        cat "$src_file"
    elif [[ -f /etc/apt/sources.list ]] && line=$(grep -m1 -E '^\s*deb\s+\S+\s+bookworm\s' /etc/apt/sources.list); then
        echo "${line/deb /deb-src }" >/etc/apt/sources.list.d/ebpf-mesh-deb-src.list
        echo "wrote /etc/apt/sources.list.d/ebpf-mesh-deb-src.list: ${line/deb /deb-src }"
    else
        echo "error: no bookworm apt source entry to copy as deb-src" >&2
        exit 1
    fi
fi

step "apt-get update"
apt-get update

step "installing golang-go dpkg-dev rsync etcd-server etcd-client openssl"
apt-get install -y --no-install-recommends golang-go dpkg-dev rsync etcd-server etcd-client openssl make

# --- source ---
rm -rf "$BUILD"
mkdir -p "$BUILD"
cd "$BUILD"
step "apt-get source --download-only kubernetes"
apt-get source --download-only kubernetes
orig=$(find . -maxdepth 1 -name "kubernetes_*.orig.tar.*" -printf "%f\n" | head -n1)
step "unpacking $orig"
mkdir src
tar -xf "$orig" -C src --strip-components=1
cd src

# --- build: make generates code first, and wants the tree at $GOPATH/src/k8s.io/kubernetes ---
step "building cmd/kube-apiserver (about 7 minutes)"
mkdir -p .go/src/k8s.io
ln -sfn ../../.. .go/src/k8s.io/kubernetes
# GOCACHE inside the tree, so removing the tree frees the build cache too.
GOPATH="$PWD/.go" GOCACHE="$PWD/.gocache" CGO_ENABLED=0 GOPROXY=off \
    make WHAT=cmd/kube-apiserver

step "installing the binary"
install -m 0755 _output/bin/kube-apiserver "$BIN.new"
mv -f "$BIN.new" "$BIN"
cd /
rm -rf "$BUILD"

v=$(cached_version || true)
if [[ "$v" != "$WANT_VERSION".* ]]; then
    echo "error: built $BIN reports version '${v}', expected ${WANT_VERSION}.x" >&2
    exit 1
fi
step "done: kube-apiserver $v at $BIN"
