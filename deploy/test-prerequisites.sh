#!/usr/bin/env bash
# What the test suite needs on a fresh Debian machine (as root): RabbitMQ on
# 127.0.0.1:5672 (installed and started if absent) and systemd-analyze (the
# unit's verification tests). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/ensure-rabbitmq.sh

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "apnsd: installing systemd (for systemd-analyze)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi

# Test queues that a killed test run leaves behind expire on their own.
rabbitmqctl -q set_policy --apply-to queues apnsd-test-expiry '^apnsd-test\.' '{"expires": 600000}' >/dev/null || true

# --- The package, example and monitoring tests (tests/package.rs, tests/examples.rs,
# tests/monitoring.rs): cargo-deb, PHP with php-amqplib, promtool, pika, amqplib.
bash deploy/prerequisites/examples.sh

# --- HTTP CONNECT proxy (tests/proxy.rs) --------------------------------------
# The proxy tests start their own tinyproxy processes on their own ports with
# their own config files; only the binary is needed. Its packaged service is
# not needed: stop and disable it so it holds no port.
if ! command -v tinyproxy >/dev/null 2>&1 && [ ! -x /usr/bin/tinyproxy ] && [ ! -x /usr/sbin/tinyproxy ]; then
    echo "apnsd: installing tinyproxy (for the proxy tests)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tinyproxy >/dev/null
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now tinyproxy >/dev/null 2>&1 || true
    fi
fi
