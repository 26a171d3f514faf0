#!/usr/bin/env bash
# What the package, example and monitoring tests need (as root, Debian):
# cargo-deb and adduser (build and install the .deb), php-cli + php-amqplib (the PHP publisher),
# promtool (Debian's prometheus package, server left stopped), pika (the Python
# examples) and amqplib (the Node publisher, from examples/node/package-lock.json).
# Idempotent and quiet; fast when everything is already there. Run by
# deploy/test-prerequisites.sh as its own block.
set -euo pipefail
cd "$(dirname "$0")/../.."

missing=()
command -v adduser >/dev/null 2>&1 || missing+=(adduser) # the package's dependency: dpkg -i does not fetch it
command -v php >/dev/null 2>&1 || missing+=(php-cli)
[[ -e /usr/share/php/PhpAmqpLib ]] || missing+=(php-amqplib)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if ((${#missing[@]})); then
    echo "apnsd: installing ${missing[*]} (examples and monitoring tests)" >&2
    # Installing prometheus must not start a server: policy-rc.d answers "not
    # now" to every maintainer script (and a container without systemd has
    # nothing to start it with anyway). Only a policy we put there is removed.
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [[ " ${missing[*]} " == *" prometheus "* ]]; then
        # Only promtool is wanted: no server at the next boot either.
        systemctl disable --quiet prometheus.service >/dev/null 2>&1 || true
    fi
fi

if ! cargo deb --version >/dev/null 2>&1; then
    echo "apnsd: installing cargo-deb" >&2
    cargo install cargo-deb --version "~3.8" --locked --quiet
fi

if ! python3 -c 'import pika' >/dev/null 2>&1; then
    echo "apnsd: installing pika" >&2
    # Debian's own python3 refuses pip installs (PEP 668): its python3-pika then.
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore pika 2>/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pika >/dev/null; }
fi

if [[ ! -d examples/node/node_modules/amqplib ]]; then
    (cd examples/node && npm ci --silent --no-audit --no-fund >/dev/null)
fi
