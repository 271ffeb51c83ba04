#!/usr/bin/env bash
# Randomised A/B of builds of ipc-bench: each round runs every build's quick same-CPU pass once,
# in a fresh random order, then prints per build and row the mean ratio to the row's baseline
# (the floor for calls, memcpy for bulk), its standard deviation and standard error.
# Differences of 0.01-0.03x need 14 rounds or more.
#
#   ipc-bench/scripts/ab.sh ROUNDS NAME=BINARY NAME=BINARY... [-- SYSTEMS [SIZES]]
#
# SYSTEMS is the `--only` list (default floor,typed-ipc; the baseline must be in it for ratios:
# floor, and memcpy for bulk sizes), SIZES a regular expression of the size column (default
# '64 B|4 KiB'; bulk sizes are 64 KiB, 1 MiB, 16 MiB). Copy each build's
# target/release/ipc-bench somewhere first: the binaries must not change while this runs.
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 2 ] || usage
rounds=$1; shift
builds=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do builds+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
systems=${1:-floor,typed-ipc}
sizes=${2:-64 B|4 KiB}
for b in "${builds[@]}"; do
    [[ $b == *=* && -x ${b#*=} ]] || { echo "ab.sh: not NAME=EXECUTABLE: $b" >&2; exit 2; }
done

for _ in $(seq "$rounds"); do
    for b in $(printf '%s\n' "${builds[@]}" | shuf); do
        name=${b%%=*}
        "${b#*=}" --quick --only "$systems" --pass same 2>/dev/null |
            awk -F'|' -v b="$name" -v sizes="^ ?($sizes) ?$" '
                $2 ~ /^ (call|bulk) $/ && $3 ~ sizes && $4 !~ /^ (floor|memcpy) $/ {
                    gsub(/ /, "", $3); gsub(/ /, "", $4); gsub(/ |x/, "", $7)
                    if ($7 != "—") print b, $4 "/" $3, $7
                }'
    done
done | sort | awk '
    { k = $1 " " $2; s[k] += $3; q[k] += $3 * $3; n[k]++ }
    END {
        for (k in s) {
            # Sample variance (n - 1): the standard error of a mean of n rounds.
            m = s[k] / n[k]; v = n[k] > 1 ? (q[k] - n[k] * m * m) / (n[k] - 1) : 0
            sd = v > 0 ? sqrt(v) : 0
            printf "%-32s n=%d mean %.3f sd %.3f se %.3f\n", k, n[k], m, sd, sd / sqrt(n[k])
        }
    }' | sort -k2
