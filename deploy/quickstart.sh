#!/usr/bin/env bash
# Quick start: a local RabbitMQ plus apnsd with the shipped config.toml, which
# runs the built-in APNs simulator in-process. Ctrl-C stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/ensure-rabbitmq.sh
cargo build --release --locked
exec ./target/release/apnsd run --config config.toml
