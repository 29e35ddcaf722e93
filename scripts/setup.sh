#!/usr/bin/env bash
# One-time set-up of a fresh machine for building and testing Quiver: the pinned Rust
# toolchain (rust-toolchain.toml) with rustfmt, clippy and the WASM targets the plugin
# examples are built for. Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if ! command -v rustup >/dev/null 2>&1; then
    echo "error: rustup is required (https://rustup.rs), then run this script again" >&2
    exit 1
fi
rustup toolchain list | grep -q "^$toolchain" || rustup toolchain install "$toolchain" --profile minimal
rustup component add --toolchain "$toolchain" rustfmt clippy >/dev/null
for target in wasm32-unknown-unknown wasm32-wasip2; do
    if ! rustup target list --toolchain "$toolchain" --installed | grep -qx "$target"; then
        echo "adding the $target target" >&2
        rustup target add --toolchain "$toolchain" "$target"
    fi
done
