#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time on the stable toolchain, then prints
# per-target executions and crashes; exits non-zero when any target crashed (a panic, an
# out-of-memory above the RSS limit, or an input that ran longer than the per-input timeout).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 60)
#   FUZZ_TARGETS="request produce" scripts/fuzz.sh 30     (a subset)
#
# How it works on stable: `cargo fuzz` with `--sanitizer none` passes only stable rustc
# flags (`-Cpasses=sancov-module` and `-Cllvm-args=-sanitizer-coverage-*` for libFuzzer's
# coverage, `--cfg fuzzing`, debug assertions and overflow checks on), so no nightly is
# needed. What it gives up is AddressSanitizer, which matters for unsafe code; the protocol
# crate has none (`unsafe` appears only in the test allocator), so panics, overflows, huge
# allocations and hangs are what there is to find, and those are all caught.
#
# Corpora live in fuzz/corpus/<target> (git-ignored) and grow from run to run; every run
# first refreshes seeds there (valid encodings of every message and of honest batches,
# written by the protocol crate's `write_fuzz_seeds` test). Crash inputs are saved in
# fuzz/artifacts/<target>/; replay one with
#   (cd fuzz && cargo fuzz run --sanitizer none <target> artifacts/<target>/<file>)
set -euo pipefail

secs="${1:-60}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: $0 [SECONDS_PER_TARGET]   (a positive whole number, default 60)" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "== installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked
fi
if ! command -v c++ >/dev/null 2>&1; then
    echo "fuzz.sh: a C++ compiler is needed to build libFuzzer (apt-get install g++)" >&2
    exit 2
fi

echo "== writing seed inputs into fuzz/corpus/"
QUIVER_FUZZ_SEEDS="$root/fuzz/corpus" cargo test -q -p quiver-protocol --lib \
    requests::wire_tests::write_fuzz_seeds -- --ignored --exact >/dev/null

cd "$root/fuzz"
echo "== building the fuzz targets (stable, --sanitizer none)"
cargo fuzz build --sanitizer none

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
logs="$root/fuzz/target/fuzz-logs"
mkdir -p "$logs"

declare -A execs crashes
failed=0
for t in $targets; do
    mkdir -p "corpus/$t" "artifacts/$t"
    before="$(find "artifacts/$t" -type f | wc -l)"
    echo "== $t: ${secs}s"
    set +e
    cargo fuzz run --sanitizer none "$t" "corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 -timeout=10 -rss_limit_mb=1024 \
        >"$logs/$t.log" 2>&1
    rc=$?
    set -e
    after="$(find "artifacts/$t" -type f | wc -l)"
    n="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logs/$t.log" | tail -1 | grep -o '[0-9]*$' || true)"
    execs[$t]="${n:-?}"
    crashes[$t]=$((after - before))
    if [ "$rc" -ne 0 ] && [ "${crashes[$t]}" -eq 0 ]; then
        # Failed without saving an input (e.g. the build or the runner itself failed).
        crashes[$t]=1
    fi
    if [ "${crashes[$t]}" -ne 0 ]; then
        failed=1
        echo "   CRASH (exit $rc); last lines of $logs/$t.log:"
        tail -25 "$logs/$t.log" | sed 's/^/   | /'
        ls -t "artifacts/$t" | head -n "$((after - before))" | sed "s|^|   artifact: fuzz/artifacts/$t/|"
    fi
done

echo
printf '%-10s %14s %8s\n' target executions crashes
total=0
for t in $targets; do
    printf '%-10s %14s %8s\n' "$t" "${execs[$t]}" "${crashes[$t]}"
    if [[ "${execs[$t]}" =~ ^[0-9]+$ ]]; then
        total=$((total + execs[$t]))
    fi
done
printf '%-10s %14s\n' total "$total"
echo "(${secs}s per target; logs in fuzz/target/fuzz-logs/)"
exit "$failed"
