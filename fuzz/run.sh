#!/usr/bin/env bash
# Runs every cargo-fuzz target (libFuzzer, native target) for a bounded time.
#
#   fuzz/run.sh                  every target, FUZZ_SECONDS (default 60) each
#   fuzz/run.sh config ratelimit only these targets
#   FUZZ_SECONDS=0 fuzz/run.sh   replay the seeds and saved corpus only
#
# Each target starts from the checked-in seeds in fuzz/seeds/<target>/ (read
# only) plus fuzz/corpus/<target>/, the git-ignored working corpus where the
# fuzzer keeps what it finds; crash inputs go to fuzz/artifacts/<target>/.
# Targets run one after another, one libFuzzer process at a time. Exits
# non-zero when any target crashed, timed out or failed to build.
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer=address, ...); on a
# stable toolchain RUSTC_BOOTSTRAP=1 unlocks them. cargo-fuzz itself is
# installed from crates.io when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET="${FUZZ_SECONDS:-60}"
CARGO_FUZZ_VERSION="0.13.2"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

echo "== building ${#targets[@]} fuzz targets"
cargo fuzz build

if [ "$SECONDS_PER_TARGET" = 0 ]; then
    limit=(-runs=0)
else
    limit=(-max_total_time="$SECONDS_PER_TARGET")
fi

logs="fuzz/target/logs"
mkdir -p "$logs"
failed=()
summary=()
for t in "${targets[@]}"; do
    seeds="fuzz/seeds/$t"
    corpus="fuzz/corpus/$t"
    if [ ! -d "$seeds" ]; then
        echo "no seed corpus $seeds for target $t" >&2
        exit 2
    fi
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    echo "== $t: ${SECONDS_PER_TARGET}s"
    log="$logs/$t.log"
    # The first corpus directory receives new inputs; the seeds are read only.
    if cargo fuzz run "$t" "$corpus" "$seeds" -- \
        "${limit[@]}" -timeout=25 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed+=("$t")
        grep -E "^(==[0-9]+==|SUMMARY|thread '|Test unit written|artifact_prefix)" "$log" | head -20 >&2 || true
        echo "-- last lines of $log:" >&2
        tail -n 25 "$log" >&2
    fi
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)
    summary+=("$(printf '%-14s %-6s %12s runs' "$t" "$status" "${runs:-?}")")
done

echo "== summary (${SECONDS_PER_TARGET}s per target; logs in $logs)"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "crashes or errors in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
