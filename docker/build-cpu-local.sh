#!/usr/bin/env bash
# Build and run the CPU image without an image registry: the base image is made from Debian packages
# (debootstrap from deb.debian.org), the image with podman from docker/Dockerfile, unchanged; then
# `lf train configs/quickstart.yaml` runs inside it. Needs root or user namespaces, and:
#   apt-get install debootstrap podman buildah
# Usage: docker/build-cpu-local.sh [WORKDIR]     (default /var/tmp/lf-docker; the rootfs is kept and reused)
# Environment: SUITE (bookworm), MIRROR (http://deb.debian.org/debian), WHEELS (a folder of local wheels, e.g.
# one holding the CPU torch wheel, mounted into the build so torch comes from disk), PIP_INDEX, CA_BUNDLE (a CA
# bundle to trust in the build, for a TLS-intercepting proxy: mounted over the image's bundle, and pip told to use it).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/var/tmp/lf-docker}
suite=${SUITE:-bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
base=localhost/lf-debian:$suite
image=localhost/lf:cpu
stamp() { printf '== %s  [%s]\n' "$1" "$(date -u +%H:%M:%S)"; }

for tool in debootstrap podman buildah; do
  command -v "$tool" >/dev/null || { echo "build-cpu-local: $tool is missing; install it: apt-get install $tool"; exit 1; }
done

if ! podman image exists "$base"; then
  stamp "debootstrap $suite into $work/rootfs"
  mkdir -p "$work"
  # install.sh finds these and skips apt: Python with venv and headers, g++ for lf's C++ kernels.
  [ -x "$work/rootfs/usr/bin/g++" ] || debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-dev,g++,ca-certificates "$suite" "$work/rootfs" "$mirror"
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  stamp "import the rootfs as $base"
  tar -C "$work/rootfs" -c . | podman import - "$base"
fi

stamp "build $image from docker/Dockerfile"
args=(--build-arg "BASE_IMAGE=$base" --build-arg "PIP_INDEX=${PIP_INDEX:-https://pypi.org/simple}")
if [ -n "${WHEELS:-}" ]; then
  # torch from the local wheel: no download.pytorch.org needed.
  args+=(-v "$WHEELS:/wheels:ro" --build-arg WHEELS=/wheels --build-arg TORCH_INDEX=)
fi
# chroot isolation: no OCI runtime, so no cgroups or rlimits to set (crun refuses both inside many sandboxes,
# this one included: "cgroups in hybrid mode not supported", "setrlimit RLIMIT_NPROC: Operation not permitted").
if [ -n "${CA_BUNDLE:-}" ]; then
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$work/pip.conf"
  args+=(-v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" -v "$work/pip.conf:/etc/pip.conf:ro")
fi
podman build --isolation chroot --network host "${args[@]}" -f docker/Dockerfile -t "$image" .

stamp "lf train configs/quickstart.yaml inside $image"
# buildah run, for the same reason; it runs in the image's WORKDIR (/app) with its ENV (the venv on PATH).
box=$(buildah from "$image")
trap 'buildah rm "$box" >/dev/null' EXIT
buildah run --isolation chroot --network host "$box" -- lf train configs/quickstart.yaml
stamp "done"
