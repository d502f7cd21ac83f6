#!/usr/bin/env bash
# The install recipe of lf's image (docker/Dockerfile's one RUN step); the platforms differ only in their base
# image, torch index and extras, so what the CPU image's build tests here is what the GPU images run.
# Inputs (environment, set from the Dockerfile's build args):
#   EXTRAS        lf's extras, comma-separated ("" for none), e.g. "gpu,api,webui"
#   PIP_INDEX     the package index for everything but torch (a mirror, if pypi.org is far)
#   TORCH_INDEX   the index torch comes from (cpu / cu128 / rocm6.4 builds); "" takes torch from PIP_INDEX
#   TORCH_VERSION the torch release to pin (lf is tested with 2.13.0)
#   WHEELS        optional folder of local wheels searched first (the offline CPU build puts torch there)
set -euo pipefail
: "${EXTRAS=}" "${PIP_INDEX:=https://pypi.org/simple}" "${TORCH_INDEX=}" "${TORCH_VERSION:=2.13.0}" "${WHEELS=}"
venv=/opt/venv

# System packages: a Python with venv and headers, and a C++ toolchain for lf's CPU kernels (csrc/). Bases that
# already carry them (the Debian base the local build makes, CANN's images) skip apt.
has_toolchain() {
  command -v g++ >/dev/null && python3 -c 'import ensurepip, os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null
}
if ! has_toolchain; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    python3 python3-venv python3-dev g++ ca-certificates
  rm -rf /var/lib/apt/lists/*
fi

python3 -m venv "$venv"
pip=("$venv/bin/pip" install --no-cache-dir --index-url "$PIP_INDEX")
[ -n "$WHEELS" ] && pip+=(--find-links "$WHEELS")
"${pip[@]}" --upgrade pip

# torch first, from its own index: left to the resolver, lf's "torch>=2.5" would pull PyPI's CUDA build.
if [ -n "$TORCH_INDEX" ]; then
  "${pip[@]}" --extra-index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"
else
  "${pip[@]}" "torch==$TORCH_VERSION"
fi
# lf itself, editable from /app (the build context), so a mounted checkout or `git pull` inside works as well;
# its dependencies at the versions CI tests (.ci/constraints.txt), as the README's install command does.
"${pip[@]}" -c /app/.ci/constraints.txt -e "/app${EXTRAS:+[$EXTRAS]}" "torch==$TORCH_VERSION"
"$venv/bin/lf" --help >/dev/null
