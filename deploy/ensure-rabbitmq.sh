#!/usr/bin/env bash
# Makes sure a RabbitMQ broker answers on 127.0.0.1:5672 (guest/guest):
# installs Debian's rabbitmq-server if missing, starts it if stopped, waits.
# Run as root on Debian; a no-op where a broker already runs.
set -euo pipefail

broker_up() {
    timeout 10 rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1
}

if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "apnsd: installing rabbitmq-server" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi

if ! broker_up; then
    echo "apnsd: starting rabbitmq-server" >&2
    rabbitmq-server -detached || true
fi

echo "apnsd: waiting for RabbitMQ on 127.0.0.1:5672" >&2
timeout 180 rabbitmqctl await_startup >/dev/null 2>&1 || true
for _ in $(seq 1 90); do
    broker_up && exit 0
    sleep 2
done
echo "apnsd: RabbitMQ did not come up" >&2
exit 1
