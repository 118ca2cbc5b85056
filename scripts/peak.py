#!/usr/bin/env python3
"""This machine's matrix-multiply peak through libtorch: the best GFLOP/s of
a large square `torch.mm` in float32 and in bfloat16, at a given thread
count, as a ceiling for the training benchmarks' achieved GFLOP/s.

    scripts/peak [--threads T] [--size N] [--repeats R] [--device cpu|cuda] [--json FILE]

Each precision: one warm-up product, then the best of R timed ones, of two
N x N matrices (2 N^3 floating-point operations each). On a CPU the same
product is also timed as a 1x1 convolution (channels-last, N/64 images of
N channels at 64 pixels) and as a 3x3 convolution (64 images of 256
channels at 32x32, 256 filters), which run on oneDNN where `torch.mm` may
run on another library (MKL's float32 path, which on AMD processors does
not use AVX-512); each precision's peak is the best of the three.
"""
import argparse
import json
import os
import sys
import time

import torch


def best_gflops(product, flops, repeats, sync=lambda: None):
    """`flops` over the best of `repeats` timed calls of `product`, after
    one untimed warm-up call, in GFLOP/s."""
    product()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        sync()
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def measure(kind, size, repeats, device):
    """The best GFLOP/s of `repeats` products of two size x size matrices."""
    a = torch.randn(size, size, device=device).to(kind)
    b = torch.randn(size, size, device=device).to(kind)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return best_gflops(lambda: torch.mm(a, b), 2 * size**3, repeats, sync)


def measure_conv(kind, size, repeats):
    """The best GFLOP/s of a 1x1 convolution that is a size x size x size
    product: size/64 images of size channels and 8x8 pixels, size filters."""
    images = max(size // 64, 1)
    x = torch.randn(images, size, 8, 8).to(kind).contiguous(memory_format=torch.channels_last)
    w = torch.randn(size, size, 1, 1).to(kind).contiguous(memory_format=torch.channels_last)
    return best_gflops(lambda: torch.nn.functional.conv2d(x, w), 2 * images * 64 * size * size, repeats)


def measure_conv3x3(kind, repeats):
    """The best GFLOP/s of a 3x3 'same' convolution of 64 channels-last
    images of 256 channels at 32x32 pixels by 256 filters: airbench's
    widest layer's kind of work, at its densest."""
    x = torch.randn(64, 256, 32, 32).to(kind).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).to(kind).contiguous(memory_format=torch.channels_last)
    flops = 2 * 64 * 32 * 32 * 256 * 256 * 9
    return best_gflops(lambda: torch.nn.functional.conv2d(x, w, padding=1), flops, repeats)


def peak(threads, size=4096, repeats=5, device="cpu"):
    """{"float32": GFLOP/s, "bfloat16": GFLOP/s, each kernel's figure, and
    the settings}."""
    torch.set_num_threads(threads)
    out = {"threads": threads, "size": size, "repeats": repeats, "device": device, "torch": torch.__version__}
    for name, kind in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        out[f"{name}_mm"] = measure(kind, size, repeats, device)
        if device == "cpu":
            out[f"{name}_conv1x1"] = measure_conv(kind, size, repeats)
            out[f"{name}_conv3x3"] = measure_conv3x3(kind, repeats)
        out[name] = max(v for k, v in out.items() if k.startswith(f"{name}_"))
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
    for name in ("float32", "bfloat16"):
        kernels = ", ".join(f"{k.split('_')[1]} {v:.1f}" for k, v in result.items() if k.startswith(f"{name}_"))
        print(f"  {name}: {kernels}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
