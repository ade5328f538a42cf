#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ (cargo fuzz, libFuzzer) and runs each for
# a bounded time; fails if any finds a crash, a leak, a hang or an OOM.
# See docs/fuzzing.md.
#
#   scripts/fuzz.sh [TARGET...]      (default: every target)
#
# FUZZ_SECONDS (20)      how long each target runs
# FUZZ_MAX_LEN (65536)   the longest input tried
# FUZZ_RSS_MB (2048)     memory limit of a run
# FUZZ_TIMEOUT (10)      seconds one input may take (longer: a hang)
# FUZZ_SANITIZER         address (default) or none
# FUZZ_LOCK              a file to flock around the build (a shared tree)
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS=${FUZZ_SECONDS:-20}
FUZZ_MAX_LEN=${FUZZ_MAX_LEN:-65536}
FUZZ_RSS_MB=${FUZZ_RSS_MB:-2048}
FUZZ_TIMEOUT=${FUZZ_TIMEOUT:-10}
FUZZ_SANITIZER=${FUZZ_SANITIZER:-address}
CARGO=${CARGO:-cargo}
TRIPLE=x86_64-unknown-linux-gnu

if ! "$CARGO" fuzz --version >/dev/null 2>&1; then
    "$CARGO" install cargo-fuzz --locked
fi

# cargo fuzz builds with nightly-only flags (-Zsanitizer, sanitizer
# coverage options). RUSTC_BOOTSTRAP=1 lets the stable toolchain take them;
# it is set for this build only, never for the project's own.
export RUSTC_BOOTSTRAP=1

lock=()
[ -n "${FUZZ_LOCK:-}" ] && lock=(flock "$FUZZ_LOCK")

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <("$CARGO" fuzz list)
fi

start=$(date +%s)
# Every target at once: they share one build of the crates.
"${lock[@]}" "$CARGO" fuzz build -s "$FUZZ_SANITIZER"
echo "fuzz: built in $(( $(date +%s) - start )) s"

bin_dir=fuzz/target/$TRIPLE/release
work=fuzz/target/fuzz-work
failed=()
summary=()
for t in "${targets[@]}"; do
    corpus=$work/corpus/$t
    scratch=$work/tmp/$t
    log=$work/$t.log
    mkdir -p "$corpus" "$scratch" "fuzz/artifacts/$t" "fuzz/corpus/$t"
    dict=()
    [ -f "fuzz/dicts/$t.dict" ] && dict=("-dict=fuzz/dicts/$t.dict")
    echo "fuzz: $t for ${FUZZ_SECONDS} s"
    # New inputs go to the scratch corpus; the committed seeds are read only.
    if TMPDIR=$scratch "$bin_dir/$t" "$corpus" "fuzz/corpus/$t" \
        -max_total_time="$FUZZ_SECONDS" -rss_limit_mb="$FUZZ_RSS_MB" \
        -max_len="$FUZZ_MAX_LEN" -timeout="$FUZZ_TIMEOUT" \
        -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 \
        "${dict[@]}" >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed+=("$t")
        tail -n 60 "$log"
    fi
    rm -rf "$scratch"
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    summary+=("$(printf '%-16s %-7s %10s runs %8s exec/s' "$t" "$status" "${runs:-?}" "${rate:-?}")")
done

printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: ${failed[*]} failed: see fuzz/artifacts/ and $work/*.log (docs/fuzzing.md: reproducing)" >&2
    exit 1
fi
