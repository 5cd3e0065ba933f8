#!/usr/bin/env bash
# deploy/wheelhouse.sh DIR: download exactly the wheels the image needs (deploy/requirements.txt, every
# package pinned) into DIR, for the image's platform (CPython 3.11, Linux glibc, this machine's CPU
# architecture), so that deploy/Dockerfile can be built from DIR with no other package index:
#
#     bash deploy/wheelhouse.sh ./wheelhouse
#     bash deploy/build-image.sh --wheelhouse ./wheelhouse     # or --offline, which does both
#
# It runs the build host's pip with the build host's pip configuration (index, mirror, certificates):
# those stay on this machine; the image only ever sees the wheel files.
# Already downloaded files are kept (pip skips them), so a second run is quick.
set -euo pipefail

usage() { echo "usage: $0 DIR   (downloads the wheels of deploy/requirements.txt into DIR)" >&2; exit 64; }
[ $# -eq 1 ] || usage
case "$1" in -h|--help) usage ;; esac
dest=$1
here=$(cd "$(dirname "$0")" && pwd)
requirements="$here/requirements.txt"

# The image's Python (deploy/Dockerfile: Debian bookworm's python3, or python:3.11-slim) and glibc 2.36.
python_version=3.11
abi=cp311
glibc_minor=36
case "$(uname -m)" in
    x86_64|amd64) arch=x86_64 ;;
    aarch64|arm64) arch=aarch64 ;;
    *) echo "wheelhouse.sh: no wheels are known for CPU architecture $(uname -m)" >&2; exit 1 ;;
esac

python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "wheelhouse.sh: needs $python with pip (set PYTHON=...)" >&2; exit 1; }

# pip download for another interpreter needs every platform tag spelled out: each manylinux level
# the image's glibc satisfies, plus the legacy aliases.
platforms=()
for minor in $(seq "$glibc_minor" -1 17); do platforms+=(--platform "manylinux_2_${minor}_${arch}"); done
platforms+=(--platform "manylinux2014_${arch}")
if [ "$arch" = x86_64 ]; then
    for minor in 12 5; do platforms+=(--platform "manylinux_2_${minor}_${arch}"); done
    platforms+=(--platform "manylinux2010_${arch}" --platform "manylinux1_${arch}")
fi

mkdir -p "$dest"
# --no-deps: the file is the full resolved set; the image's install resolves it again and fails on any gap.
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$python_version" --implementation cp --abi "$abi" "${platforms[@]}" \
    --dest "$dest" -r "$requirements"

# Exactly one file per pinned package, and nothing that is not pinned (a stale DIR from older pins).
expected=$(grep -E '^[A-Za-z0-9]' "$requirements" | sed -E 's/[[:space:]]*#.*//' | sort)
found=$(for wheel in "$dest"/*.whl; do
            name_version=$(basename "$wheel" | cut -d- -f1,2)
            echo "${name_version%%-*}==${name_version#*-}"
        done | tr '[:upper:]_' '[:lower:]-' | sort)
normalised=$(echo "$expected" | tr '[:upper:]_' '[:lower:]-' | sort)
if [ "$found" != "$normalised" ]; then
    echo "wheelhouse.sh: $dest does not hold exactly the pinned set of $requirements:" >&2
    diff <(echo "$normalised") <(echo "$found") >&2 || true
    echo "(remove the extra files, or use an empty DIR)" >&2
    exit 1
fi
echo "wheelhouse.sh: $(echo "$found" | wc -l) wheels in $dest ($(du -sh "$dest" | cut -f1))"
