#!/usr/bin/env bash
# Build every Rust example plugin under examples/plugins/ as a WASM component
# (wasm32-wasip2) and copy each .wasm into its bundle folder as the manifest's `entry`.
#
#   scripts/build-wasm-examples.sh            # from anywhere in the checkout
#   QUIVER_WASM_TARGET_DIR=/tmp/t scripts/build-wasm-examples.sh
#
# `cargo test -p quiver-plugins` runs this script itself (once per test run).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
examples="$root/examples/plugins"
target_dir="${QUIVER_WASM_TARGET_DIR:-$root/target/wasm-examples}"
target=wasm32-wasip2

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    echo "installing the $target target with rustup" >&2
    rustup target add "$target"
fi

# Cargo variables inherited from an outer `cargo test` must not leak into this build.
unset CARGO_TARGET_DIR CARGO_BUILD_TARGET RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_MAKEFLAGS
CARGO_TARGET_DIR="$target_dir" cargo build --quiet --release --target "$target" \
    --manifest-path "$examples/Cargo.toml"

for dir in "$examples"/*/; do
    [ -f "$dir/Cargo.toml" ] && [ -f "$dir/plugin.toml" ] || continue
    crate="$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$dir/Cargo.toml" | head -n1)"
    entry="$(sed -n 's/^entry *= *"\(.*\)"/\1/p' "$dir/plugin.toml" | head -n1)"
    built="$target_dir/$target/release/${crate//-/_}.wasm"
    if [ ! -f "$built" ]; then
        echo "error: $built was not built" >&2
        exit 1
    fi
    # Write then rename, so a concurrent reader never sees a half-copied module.
    cp "$built" "$dir/$entry.tmp.$$"
    mv -f "$dir/$entry.tmp.$$" "$dir/$entry"
done
