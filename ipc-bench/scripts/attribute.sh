#!/usr/bin/env bash
# Where one `echo(Vec<u8>)` call's user-space instructions go, per side, by source line of our
# own code (each instruction attributed through its inline chain; see attribute.py). Needs
# valgrind, addr2line (binutils) and python3. Builds the `instructions` driver with line
# tables into its own target directory (the release profile otherwise unchanged, so the
# counts are those of `--bin instructions`).
#
#   ipc-bench/scripts/attribute.sh [LEN] [LINES]     # LEN bytes per call (64), LINES shown (40)
#   FEATURES=echo-fd ipc-bench/scripts/attribute.sh  # echo_fd calls, one fd each way
#   FEATURES=echo-async ipc-bench/scripts/attribute.sh  # the async flavour's echo
#   LOCKED=1 ipc-bench/scripts/attribute.sh [LEN]      # its atomic read-modify-writes instead
#                                                      # (~7-8 ns each here; see locked.py)
set -euo pipefail

len=${1:-64}
shown=${2:-40}
root=$(git rev-parse --show-toplevel)
target=${TMPDIR:-/tmp}/ipc-bench-attribute-target
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

CARGO_TARGET_DIR=$target CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
    cargo build -q --manifest-path "$root/Cargo.toml" -p ipc-bench --release --bin instructions \
    --features "${FEATURES:-}"
binary=$target/release/instructions
for calls in 2000 12000; do
    mkdir "$out/$calls"
    valgrind --tool=callgrind --dump-instr=yes --trace-children=yes -q \
        --callgrind-out-file="$out/$calls/callgrind.%p" \
        "$binary" --client "$len" "$calls" 2>/dev/null
done
for side in client server; do
    if [ $side = client ]; then pick=-l; else pick=-L; fi
    a=$(grep $pick -e --client "$out"/2000/*)
    b=$(grep $pick -e --client "$out"/12000/*)
    echo "== $side, ${FEATURES:+($FEATURES) }echo of $len bytes"
    if [ -n "${LOCKED:-}" ]; then
        python3 "$root/ipc-bench/scripts/locked.py" "$a" "$b" 10000 "$binary"
    else
        python3 "$root/ipc-bench/scripts/attribute.py" "$a" "$b" 10000 "$binary" "$shown"
    fi
    echo
done
