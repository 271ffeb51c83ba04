#!/usr/bin/env python3
"""Where one call's user-space instructions go, by source line of our own code.

    ipc-bench/scripts/attribute.sh [LEN] [LINES]

(the shell script builds with line tables, runs the `instructions` driver twice under
callgrind and calls this for each side). This part reads two callgrind profiles made with
`--dump-instr=yes` (A with fewer calls than B), takes their per-instruction difference divided
by N (the extra calls), and attributes each instruction through its inline chain
(`addr2line -i`) to the innermost frame in this workspace: with fat LTO nearly everything is
inlined into a few functions, so per-function counts say little, and the innermost line of
ours says which of our steps the instruction belongs to. Instructions in other objects (libc's
malloc, memcpy, the syscall wrappers) are in the total but not in the list.

    attribute.py A B N BINARY [LINES]
"""

import collections
import os
import re
import subprocess
import sys

# The workspace this script is in: source lines under it are ours.
ROOT = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "..")) + "/"


def costs(path):
    """Exclusive instruction counts per (object, address) of a callgrind profile."""
    objects, cost = {}, collections.Counter()
    obj, last, skip = None, [0, 0], False
    for line in open(path):
        line = line.rstrip("\n")
        if not line:
            continue
        m = re.match(r"(ob|cob|fl|fi|fe|fn|cfl|cfi|cfn)=\((\d+)\)(?: (.*))?", line)
        if m:
            key, ident, name = m.groups()
            if key in ("ob", "cob") and name is not None:
                objects[ident] = name
            if key == "ob":
                obj = objects.get(ident)
            continue
        if line.startswith("calls="):
            skip = True  # the next line is the call's inclusive cost
            continue
        if line[0] in "0123456789+-*":
            parts = line.split()
            for i in range(2):  # positions: instr line
                p = parts[i]
                if p == "*":
                    continue
                if p[0] in "+-":
                    last[i] += int(p, 0)
                else:
                    last[i] = int(p, 0)
            if skip:
                skip = False
            elif len(parts) > 2:
                cost[(obj, last[0])] += int(parts[2])
    return cost


def per_call(a, b, n):
    """Per-instruction counts of one call: profile B less profile A, over N extra calls."""
    ca, cb = costs(a), costs(b)
    return {k: (cb[k] - ca.get(k, 0)) / n for k in set(ca) | set(cb)}


def inline_chains(binary, addrs):
    """Each address's inline chain in `binary`, innermost first, as `file:line` strings."""
    out = subprocess.run(
        ["addr2line", "-a", "-i", "-f", "-C", "-e", binary] + [hex(x) for x in addrs],
        capture_output=True, text=True, check=True,
    ).stdout.split("\n")
    chains, cur, i = {}, None, 0
    while i < len(out):
        if out[i].startswith("0x"):
            cur = int(out[i], 16)
            chains[cur] = []
            i += 1
        elif out[i] and i + 1 < len(out):
            chains[cur].append(out[i + 1])
            i += 2
        else:
            i += 1
    return chains


def ours_first(chain):
    """The innermost frame of a chain in this workspace (else the innermost), as `file:line`."""
    loc = next((loc for loc in chain if loc.startswith(ROOT)), None)
    return (loc or (chain[0] if chain else "?")).split(" ")[0].removeprefix(ROOT)


def main():
    a, b, n, binary = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    shown = int(sys.argv[5]) if len(sys.argv) > 5 else 40
    diff = per_call(a, b, n)
    ours = {k: v for k, v in diff.items() if k[0] and k[0].endswith(binary.rsplit("/", 1)[-1])}
    chains = inline_chains(binary, sorted({addr for (_, addr) in ours}))
    lines = collections.Counter()
    for (_, addr), v in ours.items():
        lines[ours_first(chains.get(addr, []))] += v
    print(f"total {sum(diff.values()):.0f} per call, {sum(ours.values()):.0f} in {binary}")
    by_file = collections.Counter()
    for loc, v in lines.items():
        by_file[loc.rsplit(":", 1)[0]] += v
    for f, v in by_file.most_common(12):
        print(f"{v:7.0f}  {f}")
    print()
    for loc, v in lines.most_common(shown):
        print(f"{v:7.0f}  {loc}")


if __name__ == "__main__":
    main()
