#!/usr/bin/env bash
# deploy/base-image.sh [TAG]: make the image's Debian bookworm base without any container registry:
# mmdebstrap builds a minimal root file system (python3 + venv) from the Debian archive, `docker import`
# loads it as TAG (default genfl-base:bookworm). For hosts that reach a Debian mirror but not Docker Hub:
#
#     bash deploy/base-image.sh
#     docker build -f deploy/Dockerfile --build-arg BASE_IMAGE=genfl-base:bookworm ...
#
# (deploy/build-image.sh --offline runs this.) Environment: DEBIAN_MIRROR (default
# http://deb.debian.org/debian, recorded in the image's apt sources), FORCE=1 to rebuild even when TAG
# was made from this same recipe already (the label org.genfl.base-recipe holds the recipe's hash).
# Needs root (mmdebstrap's root mode) or unprivileged user namespaces, and docker.
set -euo pipefail

tag=${1:-genfl-base:bookworm}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# python3-venv: Debian's python forbids system-wide pip (PEP 668); the image installs into a venv.
packages=python3,python3-venv

for tool in mmdebstrap docker; do
    command -v "$tool" >/dev/null || { echo "base-image.sh: needs $tool (Debian: apt-get install $tool)" >&2; exit 1; }
done

# The recipe is this script, the suite, the packages and the mirror: an unchanged recipe skips the build.
recipe=$( { cat "$0"; echo "$suite $packages $mirror"; } | sha256sum | cut -c1-16)
existing=$(docker image inspect --format '{{ index .Config.Labels "org.genfl.base-recipe" }}' "$tag" 2>/dev/null || true)
if [ "${FORCE:-0}" != 1 ] && [ "$existing" = "$recipe" ]; then
    echo "base-image.sh: $tag is up to date (recipe $recipe)"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "base-image.sh: building $tag from $suite ($mirror)"
# Nothing of this machine goes in: mmdebstrap copies the host's resolv.conf and hostname into the
# chroot for apt, so remove them (docker provides both at run time); no docs, man pages or apt lists.
mmdebstrap --variant=minbase --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -f "$1"/etc/resolv.conf "$1"/etc/hostname' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/tmp/* "$1"/root/.cache' \
    "$suite" "$work/rootfs.tar" "$mirror"

docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --change "LABEL org.genfl.base-recipe=$recipe" \
    --change "LABEL org.opencontainers.image.description=\"Debian $suite minbase with python3 and python3-venv (deploy/base-image.sh)\"" \
    --message "deploy/base-image.sh: Debian $suite minbase + $packages" \
    "$work/rootfs.tar" "$tag" >/dev/null
echo "base-image.sh: $tag ($(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
