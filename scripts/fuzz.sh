#!/usr/bin/env bash
# Fuzzes the job decoder and the frame / error-response / feedback codec with
# cargo-fuzz (libFuzzer). Needs a nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz`). The same bodies (fuzz/bodies.rs) run on stable
# under proptest in `cargo test --test fuzz`, so CI exercises them without nightly.
#
#   scripts/fuzz.sh                    # 60 s per target
#   FUZZ_SECONDS=600 scripts/fuzz.sh job_decoder
#
# Findings are written to fuzz/artifacts/<target>/; replay one with
# `cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>`.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-60}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(job_decoder frame_codec proxy_reply)

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz)" >&2
    exit 2
fi
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds"
done
