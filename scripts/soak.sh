#!/usr/bin/env bash
# Soak: SOAK_JOBS jobs (default 1,000,000) through the real apnsd binary with
# 1% bad tokens, gateway faults (binary: shutdowns and silent closes; HTTP/2
# with SOAK_PROTOCOL=http2: GOAWAYs), one SIGKILL of the daemon and one broker
# restart (rabbitmqctl stop_app/start_app). Prints lost (must be 0), bad tokens
# unreported (must be 0), duplicates against what was in flight at each fault
# (must not exceed it) and peak RSS.
#
# The broker restart disturbs everything else using that RabbitMQ. Either skip
# it (SOAK_NO_BROKER_RESTART=1), or give the soak a broker of its own:
# SOAK_OWN_BROKER=1 starts the 3-node cluster of scripts/rabbitmq-cluster.sh
# (under the lock tests/cluster.rs takes), runs against its node 1 and
# restarts that node's app, then stops the cluster. By hand: TEST_AMQP_URI and
# SOAK_RABBITMQCTL (the rabbitmqctl command for that broker) or
# SOAK_RABBITMQ_NODE (for rabbitmqctl -n). The suite's short variants
# (tests/soak.rs) run in CI on every `cargo test`.
#
#   scripts/soak.sh                                    # 1,000,000 jobs, release build
#   SOAK_JOBS=50000 SOAK_OWN_BROKER=1 scripts/soak.sh
#   SOAK_JOBS=50000 SOAK_PROTOCOL=http2 SOAK_NO_BROKER_RESTART=1 scripts/soak.sh
#   TEST_AMQP_URI=amqp://guest:guest@127.0.0.1:5673/%2f \
#       SOAK_RABBITMQ_NODE=soak@localhost scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."

export SOAK_JOBS="${SOAK_JOBS:-1000000}"
if [ -n "${SOAK_OWN_BROKER:-}" ]; then
    exec 9>"${TMPDIR:-/tmp}/apnsd-cluster.lock"
    flock 9
    trap 'bash scripts/rabbitmq-cluster.sh stop' EXIT
    bash scripts/rabbitmq-cluster.sh start
    export TEST_AMQP_URI="$(bash scripts/rabbitmq-cluster.sh uris | head -n 1)"
    export SOAK_RABBITMQCTL="bash scripts/rabbitmq-cluster.sh ctl 1"
elif [ -z "${TEST_AMQP_URI:-}" ]; then
    bash deploy/ensure-rabbitmq.sh
fi
cargo test --release --locked --test soak -- --ignored --exact soak --nocapture
