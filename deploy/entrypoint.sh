#!/bin/sh
# GenFL container entry point (the image's ENTRYPOINT, installed as /usr/local/bin/genfl-entrypoint).
# The first argument picks the role; the remaining arguments go to that command unchanged.
set -u

usage() {
    cat <<'EOF'
usage: <image> ROLE [ARGS...]

  server [ARGS]            genfl-server: the aggregation server (gRPC :50051)
  client [ARGS]            genfl-client: one client with one shard
  partition [ARGS]         genfl-partition: split a dataset into per-client shard files
  launch [ARGS]            genfl-launch: server + clients as processes in this one container
  health probe|idle [ARGS] genfl-health: gRPC health probe / idle health responder
  once server|client [ARGS]
                           run the role once; when it completes (exit 0), stay idle instead of
                           exiting, so that a controller that restarts exited containers (a
                           Kubernetes Deployment or StatefulSet) does not start a new run. The
                           server continues an interrupted run in $GENFL_OUT (run_state.pt there:
                           genfl-server --resume), skips a run whose $GENFL_OUT already holds
                           summary.json and, while idle, answers gRPC health on its port:
                           "" SERVING (alive), genfl.v2.FederatedLearning NOT_SERVING (not ready).
  help                     this text
  anything else            run as a command (sh, python, ...)

Every option can be given as a flag or as an environment variable GENFL_<OPTION>
(e.g. GENFL_SERVER=server:50051, GENFL_SHARD=/data/shard.npz); ROLE --help lists them.
EOF
}

log() { echo "genfl-entrypoint: $*" >&2; }

# idle ROLE MESSAGE: log MESSAGE, then stay alive doing nothing until SIGTERM/SIGINT (then exit 0).
idle() {
    if [ "$1" = server ]; then
        log "$2"
        address="${GENFL_ADDRESS:-0.0.0.0:50051}"
        # The same TLS (and mutual TLS) as the server it stands in for, so that probes keep working.
        set -- --port "${address##*:}"
        if [ -n "${GENFL_TLS_CERT:-}" ]; then set -- "$@" --tls-cert "$GENFL_TLS_CERT" --tls-key "${GENFL_TLS_KEY:-}"; fi
        if [ -n "${GENFL_CLIENT_CA:-}" ]; then set -- "$@" --client-ca "$GENFL_CLIENT_CA"; fi
        exec genfl-health idle "$@"
    fi
    sleeper=""
    trap 'if [ -n "$sleeper" ]; then kill "$sleeper" 2>/dev/null; fi; exit 0' TERM INT
    log "$2"
    while :; do
        sleep 3600 &
        sleeper=$!
        wait "$sleeper"
    done
}

once() {
    role="${1:-}"
    [ $# -gt 0 ] && shift
    case "$role" in
        server)
            command=genfl-server
            if [ -n "${GENFL_OUT:-}" ] && [ -f "$GENFL_OUT/summary.json" ]; then
                idle server "the run in $GENFL_OUT is complete (summary.json exists); not starting another. Remove it, or use an empty volume, to run again."
            fi
            if [ -n "${GENFL_OUT:-}" ] && [ -f "$GENFL_OUT/run_state.pt" ]; then
                log "continuing the interrupted run in $GENFL_OUT"
                set -- --resume "$@"
            fi
            ;;
        client)
            command=genfl-client
            ;;
        *)
            log "once: give server or client"
            exit 64
            ;;
    esac
    # Run as a child (not exec) so that we can idle afterwards; pass SIGTERM/SIGINT on to it.
    stopping=0
    "$command" "$@" &
    child=$!
    trap 'stopping=1; kill -TERM "$child" 2>/dev/null' TERM INT
    code=0
    wait "$child" || code=$?
    while kill -0 "$child" 2>/dev/null; do  # wait was interrupted by the trap: wait for the real exit
        code=0
        wait "$child" || code=$?
    done
    trap - TERM INT
    if [ "$stopping" -eq 1 ] || [ "$code" -ne 0 ]; then
        exit "$code"
    fi
    idle "$role" "$command completed its run; idling (a restart would start a new run)"
}

role="${1:-help}"
[ $# -gt 0 ] && shift
case "$role" in
    server)         exec genfl-server "$@" ;;
    client)         exec genfl-client "$@" ;;
    partition)      exec genfl-partition "$@" ;;
    launch)         exec genfl-launch "$@" ;;
    health)         exec genfl-health "$@" ;;
    once)           once "$@" ;;
    help|-h|--help) usage ;;
    -*)
        log "give the role first (server, client, partition, launch, health, once), e.g. 'server $role ...'"
        usage >&2
        exit 64
        ;;
    *)              exec "$role" "$@" ;;
esac
