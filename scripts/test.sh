#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up, then every unit, property and
# end-to-end test of the workspace (the end-to-end tests start real broker processes on
# 127.0.0.1 and build the WASM example plugins themselves). Extra arguments go to
# `cargo test`, e.g. `scripts/test.sh -- --nocapture`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo test --workspace --all-targets "$@"
# Doc examples of the SDKs (compiled and run where they are not `no_run`).
cargo test --workspace --doc
