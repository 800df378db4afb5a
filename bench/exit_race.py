"""How often a two-rank torchrun start aborts at exit when rank 1 leaves while rank 0 is still at work,
with and without lab.distributed.teardown's meeting point (the fix for a fresh-clone CI failure: rank 1
"terminate called without an active exception", SIGABRT, then torchrun killed rank 0 as it wrote the run).

    .venv/bin/python bench/exit_race.py --starts 30     # ~5 min on 2 cores; writes bench/results/exit_race.json

Each start: both ranks join a gloo group (lab.distributed.setup), all-reduce, all-gather an object; rank 0
then works 1 s longer. "destroy" leaves through the exit hook alone (destroy_process_group at exit, the code
before the fix); "teardown" calls lab.distributed.finish() first (monitored barrier, then destroy). Two
starts run at once, as under pytest -n 2.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCRIPT = """
import time, torch, torch.distributed as dist
from lab import distributed
par = distributed.setup('ddp')
t = torch.ones(4); dist.all_reduce(t)
objs = [None] * par.world; dist.all_gather_object(objs, par.rank)
if par.rank == 0:
    time.sleep(1.0)
if {finish}:
    distributed.finish()
"""


def start(path: str) -> bool:
    """One torchrun start; True when every rank exited cleanly."""
    from lab import distributed
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_ENV}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", path],
                         env=env, capture_output=True, text=True, timeout=300)
    return out.returncode == 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=30, help="torchrun starts per variant")
    ap.add_argument("--out", default="bench/results/exit_race.json")
    args = ap.parse_args(argv)
    from lab.runs import atomic_write_json
    result = {"starts": args.starts}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, finish in (("destroy", False), ("teardown", True)):
            path = Path(tmp) / f"{variant}.py"
            path.write_text(SCRIPT.format(finish=finish))
            with ThreadPoolExecutor(2) as pool:
                ok = list(pool.map(start, [str(path)] * args.starts))
            result[variant] = {"aborted": ok.count(False), "clean": ok.count(True)}
            print(f"{variant}: {ok.count(False)} of {args.starts} starts aborted", flush=True)
    atomic_write_json(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
