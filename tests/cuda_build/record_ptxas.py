#!/usr/bin/env python3
"""Compiler launcher of the CMake CUDA build (CMAKE_CUDA_COMPILER_LAUNCHER): runs the compile
command it is given and keeps what ptxas reports about every kernel (-Xptxas -v: registers,
spills, shared memory) next to the object, as <object>.ptxas.txt, for test_compiled_occupancy.py.
Those lines are left out of the build's own output; everything else passes through."""

from __future__ import annotations

import subprocess
import sys


def is_ptxas_line(line: str) -> bool:
    return line.startswith("ptxas info") or (line.startswith("    ") and "bytes stack frame" in line)


def main(argv: list[str]) -> int:
    cmd = argv[1:]
    obj = next((cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == "-o"), None)
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = res.stdout.splitlines(keepends=True)
    sys.stdout.write("".join(line for line in lines if not is_ptxas_line(line)))
    if obj and res.returncode == 0:
        with open(obj + ".ptxas.txt", "w") as fh:
            fh.write("".join(line for line in lines if is_ptxas_line(line)))
    return res.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv))
