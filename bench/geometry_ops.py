"""Time the engine's gradient-list operations on random lists shaped like a model's parameters.

    python bench/geometry_ops.py [--model smollm2-135m] [--repeats 7]

Runs itself twice in subprocesses: as `lab` sets up the process (freed memory kept for reuse, see
lab/__init__.py) and with LAB_KEEP_FREED_MEMORY=0 (glibc's default: big freed blocks go back to the
OS, so the next gradient-size list page-faults). Prints median milliseconds per operation.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def measure(model_name, repeats):
    import torch

    from lab import geometry as G
    from lab.models import load_model
    model, _ = load_model(model_name)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    g_f, g_r = ([torch.randn(p.shape, generator=gen) for p in params] for _ in range(2))
    d = G.add(g_f, g_r)
    ops = {
        "dot <g_f,g_r>": lambda: G.dot(g_f, g_r),
        "norm ||g_f||": lambda: G.norm(g_f),
        "alignment, 6 dots": lambda: G.alignment(g_f, g_r, d),
        "alignment, d_coef": lambda: G.alignment(g_f, g_r, d, d_coef=(1.0, 1.0)),
        "graddiff d = g_f + g_r": lambda: G.add(g_f, g_r),
        "blur_direction": lambda: G.blur_direction(g_f, g_r),
        "ngdiff_direction": lambda: G.ngdiff_direction(g_f, g_r),
        "gru_rectify": lambda: G.gru_rectify(g_f, g_r),
    }
    out = {}
    for name, fn in ops.items():
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = 1e3 * statistics.median(times)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.repeats)))
        return
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--repeats", str(args.repeats)]
    results = {}
    for label, keep in (("kept (lab default)", "1"), ("returned to OS", "0")):
        env = {**os.environ, "LAB_KEEP_FREED_MEMORY": keep}
        lines = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.splitlines()
        results[label] = json.loads(lines[-1])
    labels = list(results)
    print(f"{args.model}: median ms per call; freed memory {labels[0]} | {labels[1]}")
    for op in results[labels[0]]:
        print(f"  {op:26s} {results[labels[0]][op]:8.1f} | {results[labels[1]][op]:8.1f}")


if __name__ == "__main__":
    main()
