#!/usr/bin/env bash
# Randomised A/B of builds of ipc-bench: each round runs every build's quick same-CPU pass once,
# in a fresh random order, then prints per build and row the mean ratio to the row's baseline
# (the floor for calls, memcpy for bulk), its standard deviation and standard error, and the
# median round (which a few rounds the host disturbed move less than the mean).
# Differences of 0.01-0.03x need 14 rounds or more.
#
#   ipc-bench/scripts/ab.sh ROUNDS NAME=BINARY NAME=BINARY... [-- SYSTEMS [SIZES]]
#
# SYSTEMS is the `--only` list (default floor,typed-ipc; the baseline must be in it for ratios:
# floor, and memcpy for bulk sizes), SIZES a regular expression of the size column (default
# '64 B|4 KiB'; bulk sizes are 64 KiB, 1 MiB, 16 MiB). Copy each build's
# target/release/ipc-bench somewhere first: the binaries must not change while this runs.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
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
done | sort -k1,1 -k2,2 -k3,3g | awk '
    # Each build and row in order of value, so that the median is the middle one.
    { k = $1 " " $2; s[k] += $3; q[k] += $3 * $3; v[k, ++n[k]] = $3 }
    END {
        for (k in s) {
            # Sample variance (n - 1): the standard error of a mean of n rounds.
            m = s[k] / n[k]; var = n[k] > 1 ? (q[k] - n[k] * m * m) / (n[k] - 1) : 0
            sd = var > 0 ? sqrt(var) : 0
            h = int((n[k] + 1) / 2)
            med = n[k] % 2 ? v[k, h] : (v[k, h] + v[k, h + 1]) / 2
            printf "%-32s n=%d mean %.3f sd %.3f se %.3f median %.3f\n", k, n[k], m, sd,
                sd / sqrt(n[k]), med
        }
    }' | sort -k2
