#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on this machine, apart from the broker on 5672, for
# testing apnsd against several nodes and a node lost mid-stream.
#
#   scripts/rabbitmq-cluster.sh start            start (or finish starting) the cluster; idempotent
#   scripts/rabbitmq-cluster.sh stop             stop every node and remove its files
#   scripts/rabbitmq-cluster.sh status           exit 0 when all three nodes run, clustered
#   scripts/rabbitmq-cluster.sh uris             print the three AMQP URIs, one a line
#   scripts/rabbitmq-cluster.sh stop-node N      stop the RabbitMQ application on node N (1-3)
#   scripts/rabbitmq-cluster.sh start-node N     start it again and wait until it runs
#   scripts/rabbitmq-cluster.sh ctl N ARGS...    rabbitmqctl ARGS against node N
#
# Node N is `apnsd-cN@localhost`, AMQP on 127.0.0.1:$((BASE+N)), Erlang distribution on
# $((BASE+20000+N)) (BASE defaults to 5680: 5681-5683 and 25681-25683, clear of 5672/25672).
# Everything (data, logs, config, the cluster's own Erlang cookie) lives under
# $APNSD_CLUSTER_DIR (default /tmp/apnsd-cluster); EPMD on 4369 is shared with the main
# broker, which is why the node names differ from `rabbit@...`. The nodes run as the
# calling user with that directory as HOME, so /etc/rabbitmq is not read and the main
# broker's cookie is never touched. Needs only Debian's rabbitmq-server (no plugins).
set -euo pipefail

DIR=${APNSD_CLUSTER_DIR:-/tmp/apnsd-cluster}
BASE=${APNSD_CLUSTER_PORT_BASE:-5680}
BIN=/usr/lib/rabbitmq/bin
NODES=(1 2 3)

node_name() { echo "apnsd-c$1@localhost"; }

# Runs a command with the environment of node $1 (in a subshell, so nothing leaks).
with_node() (
    local n=$1
    shift
    export HOME="$DIR" \
        RABBITMQ_NODENAME="$(node_name "$n")" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT=$((BASE + n)) \
        RABBITMQ_DIST_PORT=$((BASE + 20000 + n)) \
        RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf" \
        RABBITMQ_CONFIG_FILE="$DIR/node$n/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$DIR/node$n/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$DIR/node$n/mnesia" \
        RABBITMQ_LOG_BASE="$DIR/node$n/log" \
        RABBITMQ_PID_FILE="$DIR/node$n/rabbitmq.pid" \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
    "$@"
)

ctl() {
    local n=$1
    shift
    with_node "$n" timeout 60 "$BIN/rabbitmqctl" -n "$(node_name "$n")" "$@"
}

node_alive() {
    [ -f "$DIR/node$1/rabbitmq.pid" ] && kill -0 "$(cat "$DIR/node$1/rabbitmq.pid")" 2>/dev/null
}

# Running members as node $1 sees them, one a line.
running_members() {
    ctl "$1" -q cluster_status --formatter json 2>/dev/null |
        tr -d ' \n' | sed -n 's/.*"running_nodes":\[\([^]]*\)\].*/\1/p' | tr ',' '\n' | tr -d '"'
}

# All three nodes run the RabbitMQ application and see each other; asks one node that answers.
clustered() {
    local n
    for n in "${NODES[@]}"; do
        if node_alive "$n"; then
            [ "$(running_members "$n" | grep -c '^apnsd-c[123]@localhost$')" = 3 ]
            return
        fi
    done
    return 1
}

prepare() {
    mkdir -p "$DIR"
    chmod 700 "$DIR"
    if [ ! -s "$DIR/.erlang.cookie" ]; then
        head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/.erlang.cookie"
        chmod 400 "$DIR/.erlang.cookie"
    fi
    : >"$DIR/rabbitmq-env.conf"
    echo '[].' >"$DIR/enabled_plugins"
    local n
    for n in "${NODES[@]}"; do
        mkdir -p "$DIR/node$n/mnesia" "$DIR/node$n/log"
        cat >"$DIR/node$n/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$((BASE + n))
loopback_users = none
disk_free_limit.absolute = 10MB
EOF
        echo '[].' >"$DIR/node$n/advanced.config"
    done
}

start_node_process() {
    local n=$1
    node_alive "$n" && return 0
    with_node "$n" "$BIN/rabbitmq-server" -detached >>"$DIR/node$n/log/startup.log" 2>&1
}

wait_app() {
    local n=$1
    # await_startup fails at once while the Erlang node is still booting; retry.
    for _ in $(seq 1 120); do
        ctl "$n" -q await_startup --timeout 5 >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    echo "rabbitmq-cluster: node $(node_name "$n") did not start; see $DIR/node$n/log" >&2
    return 1
}

join() {
    local n=$1
    running_members "$n" | grep -qx "$(node_name 1)" && return 0
    ctl "$n" -q stop_app
    ctl "$n" -q join_cluster "$(node_name 1)"
    ctl "$n" -q start_app
}

start() {
    if clustered; then
        return 0
    fi
    prepare
    local n
    for n in "${NODES[@]}"; do
        start_node_process "$n"
    done
    # Each wait is a few CLI calls of seconds each: the three run side by side.
    local pids=()
    for n in "${NODES[@]}"; do
        wait_app "$n" &
        pids+=($!)
    done
    for n in "${pids[@]}"; do
        wait "$n"
    done
    for n in 2 3; do
        join "$n"
    done
    for _ in $(seq 1 60); do
        clustered && return 0
        sleep 0.5
    done
    echo "rabbitmq-cluster: nodes did not form a cluster; see $DIR/node*/log" >&2
    return 1
}

# The data goes away with the nodes, so a signal is enough: TERM to all at once, KILL to stragglers.
stop() {
    local n pids=()
    for n in "${NODES[@]}"; do
        node_alive "$n" && pids+=("$(cat "$DIR/node$n/rabbitmq.pid")")
    done
    if [ ${#pids[@]} -gt 0 ]; then
        kill "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 1 40); do
            kill -0 "${pids[@]}" 2>/dev/null || break
            sleep 0.25
        done
        kill -9 "${pids[@]}" 2>/dev/null || true
    fi
    rm -rf "$DIR"
}

node_arg() {
    case "${1:-}" in
    1 | 2 | 3) echo "$1" ;;
    *)
        echo "rabbitmq-cluster: node must be 1, 2 or 3" >&2
        exit 2
        ;;
    esac
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) clustered ;;
uris) for n in "${NODES[@]}"; do echo "amqp://guest:guest@127.0.0.1:$((BASE + n))/%2f"; done ;;
stop-node) ctl "$(node_arg "${2:-}")" -q stop_app ;;
start-node)
    n=$(node_arg "${2:-}")
    ctl "$n" -q start_app
    wait_app "$n"
    ;;
ctl)
    n=$(node_arg "${2:-}")
    shift 2
    ctl "$n" "$@"
    ;;
*)
    echo "usage: $0 start|stop|status|uris|stop-node N|start-node N|ctl N ARGS..." >&2
    exit 2
    ;;
esac
