#!/usr/bin/env python3
"""Registers and static shared memory per kernel for sm_75, sm_86 and sm_90, from an nvcc
build's `ptxas -v` output, as the emulated driver reads them
(kernels/emu/ptxas-table.tsv: the launch check of registers x threads).

  scripts/ptxas-table.py PTXAS_TXT --write   rewrite kernels/emu/ptxas-table.tsv
  scripts/ptxas-table.py PTXAS_TXT --check   fail if the committed table is stale
"""
import os
import re
import sys

ARCHS = ("sm_75", "sm_86", "sm_90")


def table(report):
    rows, cur = {}, None
    for line in open(report):
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            cur = (m.group(1), m.group(2))
            rows[cur] = [0, 0]
            continue
        if cur is None:
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            rows[cur][0] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            rows[cur][1] = int(m.group(1))
    out = ["# kernel\tsm\tregisters\tstatic smem bytes (ptxas -v; scripts/ptxas-table.py)"]
    for (k, a), (regs, smem) in sorted(rows.items()):
        if a in ARCHS:
            out.append(f"{k}\t{a[3:]}\t{regs}\t{smem}")
    return "\n".join(out) + "\n"


def main():
    report, mode = sys.argv[1], sys.argv[2]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "kernels", "emu", "ptxas-table.tsv")
    new = table(report)
    if new.count("\n") <= 1:
        sys.exit(f"{report}: no sm_75/sm_86/sm_90 entries (build with those archs)")
    if mode == "--write":
        open(path, "w").write(new)
        print(f"wrote {path} ({new.count(chr(10)) - 1} rows)")
    elif mode == "--check":
        old = open(path).read() if os.path.exists(path) else ""
        if old != new:
            sys.exit(
                "kernels/emu/ptxas-table.tsv is stale (the emulated driver's register check uses it): "
                "run scripts/kernel-report.sh --write-table after cargo build --features cuda"
            )
        print(f"ptxas table for the emulated driver: up to date ({new.count(chr(10)) - 1} rows)")
    else:
        sys.exit("usage: ptxas-table.py PTXAS_TXT --write|--check")


main()
