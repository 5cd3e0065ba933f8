#!/usr/bin/env bash
# deploy/build-image.sh: build the GenFL image (genfl:latest) and, with --offline, everything needed on
# a machine without Docker Hub or PyTorch's index.
#
#     bash deploy/build-image.sh                   # online: python:3.11-slim base, packages from PyPI
#     bash deploy/build-image.sh --offline         # no registry needed:
#         1. deploy/base-image.sh: Debian bookworm base made with mmdebstrap  -> genfl-base:bookworm
#         2. deploy/wheelhouse.sh: the pinned wheels, downloaded on this host  -> $WHEELHOUSE
#         3. the GenFL image from that base and only that wheelhouse           -> genfl:latest
#         4. Prometheus from Debian's package on that base                     -> genfl-prometheus:latest
#
# Options:
#   --offline            as above
#   --wheelhouse DIR     install Python packages only from DIR (default with --offline: ./.wheelhouse)
#   --base IMAGE         base image of both images (default python:3.11-slim, with --offline genfl-base:bookworm)
#   --tag TAG            GenFL image tag (default genfl:latest)
#   --prometheus-tag TAG Prometheus image tag (default genfl-prometheus:latest; built with --offline
#                        or --prometheus)
#   --prometheus         also build the Prometheus image when online
#   --force              build even when an identical earlier build is there
# Environment: WHEELHOUSE (default ./.wheelhouse), WHEELHOUSE_PORT (default 8765: where the build
# reaches the wheelhouse), DEBIAN_MIRROR (deploy/base-image.sh), PIP_INDEX_URL & co. (online builds).
#
# A build is skipped when the image already carries the label org.genfl.inputs with the hash of every
# build input (the files the Dockerfile copies, the base image's id, where packages come from): an
# unchanged tree costs nothing. The wheelhouse is served read-only on 127.0.0.1 for the duration of
# the build (docker build --network host); its URL is a build argument of the venv stage only.
set -euo pipefail
cd "$(dirname "$0")/.."

offline=0 wheelhouse="" base="" tag=genfl:latest prometheus_tag=genfl-prometheus:latest
with_prometheus=0 force=0
while [ $# -gt 0 ]; do
    case "$1" in
        --offline) offline=1; with_prometheus=1 ;;
        --wheelhouse) wheelhouse=${2:?--wheelhouse DIR}; shift ;;
        --base) base=${2:?--base IMAGE}; shift ;;
        --tag) tag=${2:?--tag TAG}; shift ;;
        --prometheus-tag) prometheus_tag=${2:?--prometheus-tag TAG}; shift ;;
        --prometheus) with_prometheus=1 ;;
        --force) force=1 ;;
        -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-image.sh: unknown option $1 (--help lists them)" >&2; exit 64 ;;
    esac
    shift
done

log() { echo "build-image.sh: $*" >&2; }
# The classic builder: it is what Debian's docker.io has, and it reaches the wheelhouse on the host
# network without BuildKit's network entitlements.
export DOCKER_BUILDKIT=0

if [ "$offline" = 1 ]; then
    base=${base:-genfl-base:bookworm}
    wheelhouse=${wheelhouse:-${WHEELHOUSE:-.wheelhouse}}
    bash deploy/base-image.sh "$base"
    bash deploy/wheelhouse.sh "$wheelhouse"
fi
base=${base:-python:3.11-slim}

# up_to_date TAG HASH: TAG exists and was built from inputs with this hash.
up_to_date() {
    [ "$force" = 0 ] && [ "$(docker image inspect --format '{{ index .Config.Labels "org.genfl.inputs" }}' "$1" 2>/dev/null)" = "$2" ]
}

# remove_replaced TAG OLD_ID: the image TAG named before this build, now untagged, is removed (the
# layers the new image shares with it stay; the build stages' cache is not touched).
remove_replaced() {
    if [ -n "$2" ] && [ "$2" != "$(docker image inspect --format '{{.Id}}' "$1")" ]; then
        docker rmi "$2" >/dev/null 2>&1 || log "kept the replaced image $2 (in use)"
    fi
}

# The base's id, when it is here already (online, docker build pulls it; its tag then stands for it).
base_id=$(docker image inspect --format '{{.Id}}' "$base" 2>/dev/null || echo "$base")

# Everything deploy/Dockerfile copies (mirrors /.dockerignore), plus the package source.
genfl_inputs() {
    {
        find pyproject.toml README.md shared genfl_server genfl_client genfl_experiments \
            deploy/Dockerfile deploy/requirements.txt deploy/entrypoint.sh deploy/genfl_health.py \
            -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' -print0 \
            | sort -z | xargs -0 sha256sum
        echo "base $base_id"
        if [ -n "$wheelhouse" ]; then (cd "$wheelhouse" && ls *.whl); else echo "index ${PIP_INDEX_URL:-pypi}"; fi
    } | sha256sum | cut -c1-32
}

inputs=$(genfl_inputs)
if up_to_date "$tag" "$inputs"; then
    log "$tag is up to date (inputs $inputs)"
else
    build_args=(--build-arg "BASE_IMAGE=$base")
    server_pid=""
    if [ -n "$wheelhouse" ]; then
        [ -d "$wheelhouse" ] || { log "no wheelhouse at $wheelhouse (make it: bash deploy/wheelhouse.sh $wheelhouse)"; exit 1; }
        # A fixed port: the URL is a build argument, part of the cache key of every later step of the
        # venv stage, so a different port each time would reinstall every package.
        port=${WHEELHOUSE_PORT:-8765}
        if ! python3 -c "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', $port))" 2>/dev/null; then
            log "port $port on 127.0.0.1 is in use; set WHEELHOUSE_PORT to a free one"; exit 1
        fi
        python3 -m http.server --bind 127.0.0.1 --directory "$wheelhouse" "$port" >/dev/null 2>&1 &
        server_pid=$!
        trap '[ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null' EXIT
        for _ in $(seq 50); do
            python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break
            sleep 0.1
        done
        build_args+=(--network host --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/" --build-arg PIP_NO_INDEX=1)
        log "building $tag from $base with packages only from $wheelhouse"
    else
        for name in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
            if [ -n "${!name:-}" ]; then build_args+=(--build-arg "$name=${!name}"); fi
        done
        log "building $tag from $base with packages from ${PIP_INDEX_URL:-PyPI}"
    fi
    start=$SECONDS
    previous=$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
    docker build -f deploy/Dockerfile "${build_args[@]}" --label "org.genfl.inputs=$inputs" -t "$tag" .
    log "$tag built in $((SECONDS - start)) s"
    remove_replaced "$tag" "$previous"
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; server_pid=""; fi
fi

if [ "$with_prometheus" = 1 ]; then
    prometheus_inputs=$( { cat deploy/prometheus/Dockerfile; echo "base $base_id"; } | sha256sum | cut -c1-32)
    if up_to_date "$prometheus_tag" "$prometheus_inputs"; then
        log "$prometheus_tag is up to date (inputs $prometheus_inputs)"
    else
        # Debian's package from the mirror of the base's apt sources.
        previous=$(docker image inspect --format '{{.Id}}' "$prometheus_tag" 2>/dev/null || true)
        docker build -f deploy/prometheus/Dockerfile --build-arg "BASE_IMAGE=$base" \
            --label "org.genfl.inputs=$prometheus_inputs" -t "$prometheus_tag" deploy/prometheus
        remove_replaced "$prometheus_tag" "$previous"
    fi
fi
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^($tag|$prometheus_tag|$base) " >&2 || true
