#!/usr/bin/env python3
"""Three ways to take the fast recipes' 2x2 max-pooling, forward and
backward, on the shapes of their three pools (batch 2000, channels-last):
ATen's max_pool2d (what tch-cifar and the references call), amax over a
reshaped view, and the maximum of the four strided quarters. All three give
the same forward values; the last two split the gradient at ties.

    .venv/bin/python scripts/pooling.py [--batch 2000] [--threads 2] [--repeats 5]

Prints the best of --repeats in milliseconds per pool and in all.
"""
import argparse
import time

import torch
import torch.nn.functional as F

# The inputs of the three pools: after each group's first convolution.
SHAPES = [(64, 31, 31), (256, 15, 15), (256, 7, 7)]


def max_pool2d(x):
    return F.max_pool2d(x, 2)


def reshaped_amax(x):
    k = x.shape[2] // 2
    # [N, H, W, C] is a view of a channels-last tensor: crop, split, reduce.
    y = x.permute(0, 2, 3, 1)[:, : 2 * k, : 2 * k].unflatten(1, (k, 2)).unflatten(3, (k, 2)).amax((2, 4))
    return y.permute(0, 3, 1, 2)


def strided_maximum(x):
    k = x.shape[2] // 2

    def quarter(i, j):
        return x[:, :, i : 2 * k : 2, j : 2 * k : 2]

    return torch.maximum(torch.maximum(quarter(0, 0), quarter(0, 1)), torch.maximum(quarter(1, 0), quarter(1, 1)))


def best(f, x, repeats):
    forward, backward = [], []
    for _ in range(repeats):
        leaf = x.detach().requires_grad_()
        start = time.perf_counter()
        y = f(leaf)
        mid = time.perf_counter()
        y.backward(torch.ones_like(y))
        end = time.perf_counter()
        forward.append(mid - start)
        backward.append(end - mid)
    return 1000 * min(forward), 1000 * min(backward)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ways = [max_pool2d, reshaped_amax, strided_maximum]
    totals = {f.__name__: 0.0 for f in ways}
    print(f"batch {args.batch}, {args.threads} threads, channels-last, best of {args.repeats} (ms)")
    print(f"{'input':16} {'way':16} {'forward':>8} {'backward':>9}")
    for shape in SHAPES:
        x = torch.randn(args.batch, *shape).contiguous(memory_format=torch.channels_last)
        expected = max_pool2d(x)
        for f in ways:
            if not torch.equal(f(x), expected):
                raise SystemExit(f"pooling: {f.__name__} differs from max_pool2d on {shape}")
            fwd, bwd = best(f, x, args.repeats)
            totals[f.__name__] += fwd + bwd
            print(f"{'x'.join(map(str, shape)):16} {f.__name__:16} {fwd:8.1f} {bwd:9.1f}")
    for name, total in totals.items():
        print(f"all three pools, {name}: {total:.1f} ms")


if __name__ == "__main__":
    main()
