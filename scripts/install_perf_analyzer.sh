#!/usr/bin/env bash
# Install NVIDIA's perf_analyzer (what GenAI-Perf drives) into a bin folder, from the registries only.
#
# PyPI's `perf-analyzer` 0.1.0 is a placeholder without the binary; the tritonclient 2.51.0 wheel (the version of
# the tritonserver in nvidia-pytriton) ships bin/perf_analyzer. It links libcudart.so.12 (even for CPU-only use:
# taken from PyPI's nvidia-cuda-runtime-cu12 wheel) and libb64.so.0d (Debian's libb64-0d). The binary and
# libcudart go to <BIN_DIR>/../lib/perf_analyzer/; <BIN_DIR>/perf_analyzer is a wrapper that finds them.
# Pinned versions and checksums; idempotent.
#   scripts/install_perf_analyzer.sh [BIN_DIR]     BIN_DIR: default the active virtual environment's bin
set -euo pipefail
TRITONCLIENT=tritonclient==2.51.0
CUDART=nvidia-cuda-runtime-cu12==12.4.127
PERF_ANALYZER_SHA256=a8e3fa6d2fcd535770f18fa3c9baf21aee85697352637d24c6b2818401c95a34
CUDART_SHA256=8774224f5b11a73b15d074a3fcce7327322c5c4cfdfd924d6a826779eec968fe

target="${1:-${VIRTUAL_ENV:?activate a virtual environment or name a bin folder}/bin}"
libs="$(cd "$target/.." && pwd)/lib/perf_analyzer"
if [ -x "$target/perf_analyzer" ] && echo "$PERF_ANALYZER_SHA256  $libs/perf_analyzer" | sha256sum --check --status; then
  echo "perf_analyzer: already in $target"
  exit 0
fi
if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get install -y -q libb64-0d >/dev/null
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --dest "$work" "$TRITONCLIENT" "$CUDART"
mkdir -p "$libs"
python3 - "$work" "$libs" <<'PY'
import sys
import zipfile
from pathlib import Path

work, libs = Path(sys.argv[1]), Path(sys.argv[2])
wanted = {"data/bin/perf_analyzer": "perf_analyzer", "cuda_runtime/lib/libcudart.so.12": "libcudart.so.12"}
for wheel in work.glob("*.whl"):
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            for suffix, name in wanted.items():
                if member.endswith(suffix):
                    path = libs / name
                    path.write_bytes(archive.read(member))
                    path.chmod(0o755)
PY
echo "$PERF_ANALYZER_SHA256  $libs/perf_analyzer" | sha256sum --check --quiet
echo "$CUDART_SHA256  $libs/libcudart.so.12" | sha256sum --check --quiet
cat >"$target/perf_analyzer.partial" <<EOF
#!/usr/bin/env bash
# perf_analyzer 2.51.0 from the tritonclient wheel (scripts/install_perf_analyzer.sh); libcudart beside it.
export LD_LIBRARY_PATH="$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$libs/perf_analyzer" "\$@"
EOF
chmod 755 "$target/perf_analyzer.partial"
mv "$target/perf_analyzer.partial" "$target/perf_analyzer"
echo "installed perf_analyzer into $target: $("$target/perf_analyzer" --version 2>&1 | head -c 60 || true)"
