#!/usr/bin/env python3
"""This machine's matrix-multiply peak through libtorch: the best GFLOP/s of
a large square `torch.mm` in float32 and in bfloat16, at a given thread
count, as a ceiling for the training benchmarks' achieved GFLOP/s.

    scripts/peak [--threads T] [--size N] [--repeats R] [--device cpu|cuda] [--json FILE]

Each precision: one warm-up product, then the best of R timed ones, of two
N x N matrices (2 N^3 floating-point operations each).
"""
import argparse
import json
import os
import sys
import time

import torch


def measure(kind, size, repeats, device):
    """The best GFLOP/s of `repeats` products of two size x size matrices."""
    a = torch.randn(size, size, device=device).to(kind)
    b = torch.randn(size, size, device=device).to(kind)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def peak(threads, size=4096, repeats=5, device="cpu"):
    """{"float32": GFLOP/s, "bfloat16": GFLOP/s, and the settings}."""
    torch.set_num_threads(threads)
    out = {"threads": threads, "size": size, "repeats": repeats, "device": device, "torch": torch.__version__}
    for name, kind in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        out[name] = measure(kind, size, repeats, device)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    ap.add_argument("--size", type=int, default=4096, help="the matrices' side (4096)")
    ap.add_argument("--repeats", type=int, default=5, help="timed products per precision (5)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the result to this file")
    args = ap.parse_args()
    if args.threads < 1 or args.size < 1 or args.repeats < 1:
        sys.exit("peak: --threads, --size and --repeats take positive numbers")
    result = peak(args.threads, args.size, args.repeats, args.device)
    print(f"matrix-multiply peak on {args.device}, {args.threads} threads, {args.size}^2 matrices, best of "
          f"{args.repeats}: float32 {result['float32']:.1f} GFLOP/s, bfloat16 {result['bfloat16']:.1f} GFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
