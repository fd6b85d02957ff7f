#!/usr/bin/env python3
"""rewrite_pieces.py SIZE TOTAL: the pieces a benchmark rewrites, one "OFFSET LENGTH" line each.

Sizes 4 KiB..1 MiB (4 KiB multiples) summing to TOTAL, one piece in each of as many equal
slots of a SIZE-byte volume, at a random 4 KiB-aligned place inside its slot. The seed is
fixed, so every benchmark (tests/harness/bench-backup.sh, bench-incremental-qcow2.sh)
rewrites the same places of a volume of the same size.
"""
import random
import sys

size, total = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(20240610)
sizes, left = [], total
while left > 0:
    n = min(left, rng.randint(1, 256) * 4096)
    sizes.append(n)
    left -= n
slot = size // len(sizes) // 4096 * 4096
for i, n in enumerate(sizes):
    room = max(slot - n, 0) // 4096
    print(i * slot + rng.randint(0, room) * 4096, n)
