#!/usr/bin/env bash
# Soak: SOAK_JOBS jobs (default 1,000,000) through the real apnsd binary with
# 1% bad tokens, gateway shutdowns and silent closes, one SIGKILL of the daemon
# and one broker restart (rabbitmqctl stop_app/start_app). Prints lost (must be
# 0), bad tokens unreported (must be 0), duplicates and peak RSS.
#
# The broker restart disturbs everything else using that RabbitMQ: run the soak
# alone, or against a broker of its own (TEST_AMQP_URI, and
# SOAK_RABBITMQ_NODE for rabbitmqctl -n). SOAK_NO_BROKER_RESTART=1 skips it.
# The suite's short variants (tests/soak.rs) run in CI on every `cargo test`.
#
#   scripts/soak.sh                 # 1,000,000 jobs, release build
#   SOAK_JOBS=50000 scripts/soak.sh
#   TEST_AMQP_URI=amqp://guest:guest@127.0.0.1:5673/%2f \
#       SOAK_RABBITMQ_NODE=soak@localhost scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."

export SOAK_JOBS="${SOAK_JOBS:-1000000}"
[ -n "${TEST_AMQP_URI:-}" ] || bash deploy/ensure-rabbitmq.sh
cargo test --release --locked --test soak -- --ignored --exact soak --nocapture
