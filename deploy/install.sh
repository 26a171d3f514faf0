#!/usr/bin/env bash
# Installs apnsd as a systemd service on Debian: a system user, /etc/apnsd
# (root:apnsd 0750), the binary, the unit and an example configuration.
# Idempotent; never overwrites an existing /etc/apnsd/apnsd.toml.
# Usage (as root, from the repository): bash deploy/install.sh [path/to/apnsd]
set -euo pipefail
cd "$(dirname "$0")/.."

binary=${1:-target/release/apnsd}
if [[ ! -x $binary ]]; then
    cargo build --release --locked
    binary=target/release/apnsd
fi

if ! id apnsd >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin apnsd
fi

install -d -o root -g apnsd -m 0750 /etc/apnsd
install -o root -g root -m 0755 "$binary" /usr/local/bin/apnsd
install -o root -g root -m 0644 systemd/apnsd.service /etc/systemd/system/apnsd.service
if [[ ! -e /etc/apnsd/apnsd.toml ]]; then
    install -o root -g apnsd -m 0640 deploy/apnsd.production.toml /etc/apnsd/apnsd.toml
    echo "apnsd: wrote /etc/apnsd/apnsd.toml: put your certificates in /etc/apnsd (root:apnsd, 0640) and edit it"
fi

if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    echo "apnsd: installed; start with: apnsd check --config /etc/apnsd/apnsd.toml && systemctl enable --now apnsd"
else
    echo "apnsd: installed (systemd is not running here; start it with your init system)"
fi
