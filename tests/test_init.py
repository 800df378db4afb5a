"""lab/__init__.py: process settings made on import (OpenMP waiting, glibc keeping freed memory)."""
import json
import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json
import lab, torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
t = torch.empty(2 ** 24)            # 64 MiB: glibc's default gives it its own mmap
during = libc.mallinfo2().hblkhd    # bytes in per-block mmaps
del t
print(json.dumps({"mmapped": during, "wait": __import__("os").environ.get("OMP_WAIT_POLICY")}))
"""


def _probe(**env):
    full = {k: v for k, v in os.environ.items() if k not in ("LAB_KEEP_FREED_MEMORY", "MALLOC_MMAP_MAX_",
                                                             "MALLOC_TRIM_THRESHOLD_", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**full, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
def test_import_keeps_big_freed_blocks_on_the_heap_unless_opted_out():
    try:
        kept = _probe()
    except subprocess.CalledProcessError as err:   # no mallinfo2: glibc < 2.33 or not glibc
        pytest.skip(f"mallinfo2 unavailable: {err.stderr[-200:]}")
    assert kept["mmapped"] < 2 ** 26, kept           # the 64 MiB tensor came from the heap
    assert kept["wait"] == "PASSIVE"
    default = _probe(LAB_KEEP_FREED_MEMORY="0")
    assert default["mmapped"] >= 2 ** 26, default    # glibc's own behaviour: a private mmap
    assert _probe(MALLOC_MMAP_MAX_="65536")["mmapped"] >= 2 ** 26   # a user's own setting wins
