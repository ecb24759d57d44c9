#!/usr/bin/env bash
# A real Kubernetes API server (kube-apiserver + etcd) and a kubectl of the same version, from Debian packages only,
# for the `k8s_api` tests (tests/k8s_cluster.py starts and stops them; this script only installs).
#
#   scripts/kube_api_server.sh install   build kube-apiserver, take kubectl and etcd; skipped when already there
#   scripts/kube_api_server.sh dir       print the folder the tests read the binaries from
#
# No registry ships a kube-apiserver binary (see docs/kubernetes-api-server.md for what was looked at). Debian's
# `kubernetes` source package does: it is the whole Kubernetes 1.20.2 tree with its Go dependencies vendored, so
# kube-apiserver builds offline with Debian's Go. kubectl 1.20.2 is Debian's `kubernetes-client` binary (unpacked
# here, not installed: it would clash with another package's /usr/bin/kubectl), etcd 3.4 is `etcd-server`.
# The binaries go to $KUBE_API_SERVER_DIR (default /opt/ft-exporter/kubernetes-1.20.2/bin). Needs root for apt-get.
set -euo pipefail

KUBERNETES_SOURCE_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
KUBERNETES_VERSION="v1.20.2"
BIN_DIR="${KUBE_API_SERVER_DIR:-/opt/ft-exporter/kubernetes-1.20.2/bin}"

say() { echo "kube_api_server: $*"; }
die() { echo "kube_api_server: error: $*" >&2; exit 1; }

# apt-get with a private list of Debian source repositories: the machine's own `deb` entries turned into `deb-src`
# ones, so no mirror is named here and the machine's apt configuration is left as it was.
source_apt() {
  local apt_dir="$1"
  shift
  apt-get -q -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$apt_dir/sources.list.d" \
    -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache::Archives="$apt_dir/archives" "$@"
}

write_source_lists() {
  local apt_dir="$1" found=""
  mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial" "$apt_dir/archives/partial"
  for list in /etc/apt/sources.list.d/*.sources; do
    [ -f "$list" ] || continue
    grep -qE '^Types:(.* )?deb( |$)' "$list" || continue  # binary entries (not deb-src)
    sed 's/^Types:.*/Types: deb-src/' "$list" >"$apt_dir/sources.list.d/$(basename "$list")"
    found=1
  done
  if [ -f /etc/apt/sources.list ]; then
    sed -n 's/^deb \(.*\)$/deb-src \1/p' /etc/apt/sources.list >"$apt_dir/sources.list.d/from-sources.list"
    [ -s "$apt_dir/sources.list.d/from-sources.list" ] && found=1
  fi
  [ -n "$found" ] || die "no Debian 'deb' entries found under /etc/apt to derive source entries from"
}

# pkg/generated/openapi is made at build time (Makefile.generated_files, gen_openapi): openapi-gen over every
# package tagged `+k8s:openapi-gen=` (staging named by its vendor/ path), less code-generator and sample-apiserver.
# The API-rule violations it reports must equal the tree's known list, which checks that the package set is right.
generate_openapi() {
  local tree="$1" gopath="$2" packages
  (cd "$gopath/src/k8s.io/kubernetes" &&
    go build -o "$gopath/bin/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen)
  packages="$(cd "$tree" &&
    find -H . \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune -o -type f -name '*.go' -print0 |
    xargs -0 grep -l '^// *+k8s:' | xargs grep -l '+k8s:openapi-gen=' |
    sed 's|^\./staging/src/|vendor/|; s|^\./||' | grep -v -E '^vendor/k8s.io/(code-generator|sample-apiserver)/' |
    xargs -n1 dirname | LC_ALL=C sort -u | sed 's|^|k8s.io/kubernetes/|' | paste -sd,)"
  (cd "$gopath/src/k8s.io/kubernetes" &&
    "$gopath/bin/openapi-gen" --logtostderr -i "$packages" -p k8s.io/kubernetes/pkg/generated/openapi \
      -O zz_generated.openapi -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
      -r "$gopath/openapi-violations.report" 2>"$gopath/openapi-gen.log") ||
    die "openapi-gen failed: $(tail -n 5 "$gopath/openapi-gen.log")"
  diff <(LC_ALL=C sort "$gopath/openapi-violations.report") \
    <(LC_ALL=C sort "$tree/api/api-rules/violation_exceptions.list") >/dev/null ||
    die "openapi-gen's API-rule report differs from the tree's known list: the package set is wrong"
}

build_kube_apiserver() {
  local work="$1" tree gopath package ldflags
  write_source_lists "$work/apt"
  source_apt "$work/apt" update >/dev/null
  (cd "$work" && source_apt "$work/apt" source --download-only "kubernetes=$KUBERNETES_SOURCE_VERSION" >/dev/null)
  tree="$work/kubernetes"
  # apt-get checked the files against the signed Release file; dpkg-source only warns that it has no keyring for
  # the uploader's own signature, so its output is kept for a failure.
  dpkg-source -x "$work"/kubernetes_"${KUBERNETES_SOURCE_VERSION}".dsc "$tree" >"$work/dpkg-source.log" 2>&1 ||
    die "dpkg-source failed: $(tail -n 5 "$work/dpkg-source.log")"
  # Kubernetes 1.20 builds in GOPATH mode from its vendor/ folder, as its own `make` and Debian's rules do.
  gopath="$work/gopath"
  mkdir -p "$gopath/src/k8s.io"
  ln -s "$tree" "$gopath/src/k8s.io/kubernetes"
  export CGO_ENABLED=0 GO111MODULE=off GOPATH="$gopath" GOPROXY=off GOFLAGS= GOCACHE="$work/gocache"
  generate_openapi "$tree" "$gopath"
  package=k8s.io/kubernetes/vendor/k8s.io
  ldflags="-s -w"
  for version_package in component-base/version client-go/pkg/version; do
    ldflags+=" -X $package/$version_package.gitVersion=$KUBERNETES_VERSION"
    ldflags+=" -X $package/$version_package.gitMajor=1 -X $package/$version_package.gitMinor=20"
    ldflags+=" -X $package/$version_package.gitTreeState=clean"
  done
  (cd "$gopath/src/k8s.io/kubernetes" &&
    go build -trimpath -ldflags "$ldflags" -o "$BIN_DIR/kube-apiserver.tmp" ./cmd/kube-apiserver)
  mv "$BIN_DIR/kube-apiserver.tmp" "$BIN_DIR/kube-apiserver"
}

unpack_kubectl() {
  local work="$1"
  (cd "$work" && apt-get download -q "kubernetes-client=$KUBERNETES_SOURCE_VERSION" >/dev/null)
  dpkg-deb -x "$work"/kubernetes-client_*.deb "$work/client"
  install -m 0755 "$work/client/usr/bin/kubectl" "$BIN_DIR/kubectl"
}

install_all() {
  local started=$SECONDS work
  [ "$(id -u)" -eq 0 ] || die "installing packages needs root"
  export DEBIAN_FRONTEND=noninteractive
  mkdir -p "$BIN_DIR"
  if [ -x "$BIN_DIR/kube-apiserver" ] && [ -x "$BIN_DIR/kubectl" ] && [ -x "$BIN_DIR/etcd" ]; then
    say "kube-apiserver, kubectl and etcd already in $BIN_DIR"
    return
  fi
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends golang-go dpkg-dev etcd-server >/dev/null
  # etcd-server starts a system etcd on the default ports where an init system runs; the tests start their own.
  ln -sf "$(command -v etcd)" "$BIN_DIR/etcd"
  work="$(mktemp -d)"
  chown _apt "$work" 2>/dev/null || chmod 777 "$work"  # apt-get download/source fetch as the _apt user
  trap 'rm -rf -- "$work"; trap - RETURN' RETURN  # once: a RETURN trap left set fires again, with $work gone
  [ -x "$BIN_DIR/kubectl" ] || unpack_kubectl "$work"
  [ -x "$BIN_DIR/kube-apiserver" ] || build_kube_apiserver "$work"
  "$BIN_DIR/kube-apiserver" --version >/dev/null || die "the built kube-apiserver does not run"
  say "kube-apiserver $KUBERNETES_VERSION, kubectl and etcd ready in $BIN_DIR in $((SECONDS - started))s"
}

case "${1:-}" in
  install) install_all ;;
  dir) echo "$BIN_DIR" ;;
  *) die "usage: $0 install|dir" ;;
esac
