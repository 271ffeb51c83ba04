#!/usr/bin/env python3
"""The atomic read-modify-write instructions of one call, per side, by source line of ours.

    LOCKED=1 ipc-bench/scripts/attribute.sh [LEN]

An instruction count weighs every instruction alike, but an atomic read-modify-write (a
`lock`-prefixed instruction, or `xchg` with memory: a `fetch_add`, a `compare_exchange`, a
`parking_lot` lock or unlock, whatever its `Ordering`) costs ~7-8 ns on these VMs, some 20-30
plain ones. This counts them: the per-instruction difference of two callgrind profiles (as
`attribute.py`), each executed instruction looked up in `objdump -d` of its object, each
locked one attributed through its inline chain to the innermost line of ours.

    locked.py A B N BINARY
"""

import collections
import re
import subprocess
import sys

from attribute import inline_chains, ours_first, per_call

LOCKED = re.compile(r"lock\s|xchg\s+[^,]*,.*\(|xchg\s+.*\(.*\),")


def instructions(obj):
    """Each instruction of `obj` by address, as `objdump -d` prints it."""
    dis = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", obj], capture_output=True, text=True, check=True
    ).stdout
    found = (re.match(r"\s*([0-9a-f]+):\s+(.*)", line) for line in dis.split("\n"))
    return {int(m.group(1), 16): m.group(2) for m in found if m}


def main():
    a, b, n, binary = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    by_object = collections.defaultdict(dict)
    for (obj, addr), v in per_call(a, b, n).items():
        if obj and v > 0.5:
            by_object[obj][addr] = v
    total = 0.0
    for obj, executed in sorted(by_object.items()):
        text = instructions(obj)
        hits = {addr: v for addr, v in executed.items() if LOCKED.match(text.get(addr, ""))}
        total += sum(hits.values())
        print(f"{sum(hits.values()):5.1f}  in {obj.rsplit('/', 1)[-1]}")
        if not hits or not obj.endswith(binary.rsplit("/", 1)[-1]):
            continue
        chains = inline_chains(obj, sorted(hits))
        lines = collections.Counter()
        for addr, v in hits.items():
            # The innermost frame of ours is the atomic's caller (a lock, `fetch_add`): show
            # the two frames of ours above it too.
            frames = [ours_first(chains[addr][i:]) for i in range(len(chains[addr]))]
            own = [f for f in dict.fromkeys(frames) if not f.startswith("/")][:3]
            lines[f"{text[addr].split()[0]:8s} " + " <- ".join(own)] += v
        for line, v in lines.most_common():
            print(f"  {v:5.1f}  {line}")
    print(f"{total:5.1f}  locked instructions per call")


if __name__ == "__main__":
    main()
