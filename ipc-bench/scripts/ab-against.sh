#!/usr/bin/env bash
# Randomised A/B of this checkout's ipc-bench against the one of an earlier commit: builds
# COMMIT in a temporary worktree (its own target directory, kept for the next run), builds
# this checkout, copies both binaries and hands them to ab.sh.
#
#   ipc-bench/scripts/ab-against.sh COMMIT ROUNDS [-- SYSTEMS [SIZES]]
#
# SYSTEMS and SIZES as for ab.sh (default floor,typed-ipc and '64 B|4 KiB'). Example, the
# Xeon host's full run of 2026-12-02 08:11 UTC (docs/benchmarks-2026-12-02-xeon.md) against now:
#
#   ipc-bench/scripts/ab-against.sh 1f7d31b 24
#   ipc-bench/scripts/ab-against.sh 1f7d31b 24 -- floor,typed-ipc,floor+fd,typed-ipc+fd
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 2 ] || usage
commit=$(git rev-parse --short "$1^{commit}") || usage
rounds=$2; shift 2
root=$(git rev-parse --show-toplevel)
tree=${TMPDIR:-/tmp}/ipc-bench-ab-$commit
out=$(mktemp -d)
trap 'rm -rf "$out"; git -C "$root" worktree remove --force "$tree" 2>/dev/null || true' EXIT

git -C "$root" worktree add --detach --force "$tree" "$commit" >/dev/null
echo "ab-against: building $commit" >&2
CARGO_TARGET_DIR=$tree-target cargo build -q --manifest-path "$tree/Cargo.toml" -p ipc-bench --release
cp "$tree-target/release/ipc-bench" "$out/$commit"
echo "ab-against: building this checkout" >&2
cargo build -q --manifest-path "$root/Cargo.toml" -p ipc-bench --release
cp "${CARGO_TARGET_DIR:-$root/target}/release/ipc-bench" "$out/now"
"$root/ipc-bench/scripts/ab.sh" "$rounds" "$commit=$out/$commit" "now=$out/now" "$@"
