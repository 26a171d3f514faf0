#!/usr/bin/env bash
# Builds the Debian package target/debian/apnsd_<version>_<arch>.deb from a
# release build (fat LTO: about three and a half minutes on 2 cores) and prints
# its path. Installs cargo-deb first if it is missing. Further arguments go to
# `cargo deb`: the test suite packages the binary `cargo test` just built with
#   bash scripts/build-deb.sh --profile dev --no-build --fast
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "apnsd: installing cargo-deb" >&2
    cargo install cargo-deb --version "~3.8" --locked --quiet
fi

# The packaged unit runs the packaged binary: /usr/bin, not install.sh's /usr/local/bin.
mkdir -p target/debian
sed 's|/usr/local/bin/apnsd|/usr/bin/apnsd|' systemd/apnsd.service >target/debian/apnsd.service
grep -q '^ExecStart=/usr/bin/apnsd ' target/debian/apnsd.service

cargo deb --locked "$@"
