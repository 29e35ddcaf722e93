#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up, then every unit, property and
# end-to-end test of the workspace (the end-to-end tests start real broker processes on
# 127.0.0.1 and build the WASM example plugins themselves). Extra arguments go to
# `cargo test`, e.g. `scripts/test.sh -- --nocapture`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
# --no-fail-fast: every test binary runs even after one fails, so one failure hides no other.
cargo test --workspace --all-targets --no-fail-fast "$@"
# Doc examples of the SDKs (compiled and run where they are not `no_run`).
cargo test --workspace --doc --no-fail-fast
# Opt-in soak (SOAK=1, ~5 min; not a QUIVER_ variable: brokers read those as config keys): the cluster under >= 20 leader kills and >= 10
# network partitions, with the checker's counts printed.
if [[ "${SOAK:-0}" == "1" ]]; then
    cargo test --test tests cluster_faults -- --ignored --nocapture
fi
