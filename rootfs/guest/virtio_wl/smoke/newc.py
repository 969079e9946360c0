#!/usr/bin/env python3
"""Writes a newc cpio archive of a directory tree (no cpio tool needed): newc.py DIR OUT."""
import os, stat, sys

root, out = sys.argv[1], sys.argv[2]
ino = 1


def entry(f, name, st, data=b""):
    global ino
    hdr = "070701" + "".join(
        "%08x" % v
        for v in (ino, st.st_mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
    )
    ino += 1
    f.write(hdr.encode() + name.encode() + b"\0")
    f.write(b"\0" * ((4 - (110 + len(name) + 1) % 4) % 4))
    f.write(data)
    f.write(b"\0" * ((4 - len(data) % 4) % 4))


with open(out, "wb") as f:
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for n in sorted(dirs) + sorted(files):
            p = os.path.join(d, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            data = open(p, "rb").read() if stat.S_ISREG(st.st_mode) else b""
            entry(f, rel, st, data)
    entry(f, "TRAILER!!!", os.stat_result((0,) * 10))
