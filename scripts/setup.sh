#!/usr/bin/env bash
# The one set-up command (README "Quick start", .ci/run): everything the tests need on a Debian or
# Ubuntu machine, from the repository root:
#
#     bash scripts/setup.sh
#
# 1. Debian packages: python3-venv (the venv), prometheus + promtool (observability tests),
#    iproute2 (network namespaces of the network-cut test), openssl (test certificates), docker.io,
#    docker-compose and mmdebstrap (the container test and deploy/build-image.sh --offline).
#    Installed with apt-get when missing (as root, or through sudo).
# 2. The virtual environment .venv: torch/torchvision pinned, then the project editable with [dev].
#
# Docker's daemon is not started here (on machines without systemd .ci/run starts dockerd itself).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(python3-venv prometheus iproute2 openssl docker.io docker-compose mmdebstrap)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f '${Status}\n' "$package" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup.sh: installing Debian packages: ${missing[*]}"
    as_root=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { echo "setup.sh: need root or sudo to install ${missing[*]}" >&2; exit 1; }
        as_root=(sudo)
    fi
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
python -m pip install --quiet -e '.[dev]'
python -c "import torch, torchvision, grpc, genfl_shared, genfl_server, genfl_client, genfl_experiments; print('setup.sh: venv ready, torch', torch.__version__)"
