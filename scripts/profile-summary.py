#!/usr/bin/env python3
"""Where one training step's time goes, from a Chrome trace of libtorch's
profiler: `tch-cifar train --profile FILE`, or the PyTorch references'
`--profile FILE` (torch.profiler's export_chrome_trace). Both record the
same ATen operators, so their tables compare kind by kind.

    scripts/profile-summary.py TRACE [TRACE ...] [--json FILE]

Each operator's self time (its time less its children's) goes to a kind:
the data (everything before the first convolution: batch selection,
flips, translations, layout), the optimizer (everything after the last
backward node), or, in the forward and backward passes, what the operator
or its outermost named ancestor is: convolutions, BatchNorm, GELU, pooling,
the head and loss, layout copies, or other. One column per trace.
"""
import argparse
import json
import sys

# (kind, substrings of an ATen operator's name), first match wins.
KINDS = [
    ("convolutions", ["conv"]),
    ("BatchNorm", ["batch_norm"]),
    ("GELU", ["gelu"]),
    ("pooling", ["max_pool", "pool2d"]),
    ("head and loss", ["linear", "addmm", "aten::mm", "mmbackward", "matmul", "cross_entropy", "log_softmax",
                       "nll_loss", "label_smooth"]),
    ("layout copies", ["copy_", "contiguous", "clone", "to_dense", "reorder", "permute"]),
]
ORDER = ["data", "convolutions", "BatchNorm", "GELU", "pooling", "head and loss", "layout copies", "optimizer",
         "other"]


def kind_of(name):
    # Autograd's nodes are CamelCase: ConvolutionBackward0, NativeBatchNormBackward0.
    name = name.lower().replace("batchnorm", "batch_norm").replace("maxpool", "max_pool")
    for kind, patterns in KINDS:
        if any(p in name for p in patterns):
            return kind
    return None


def load(path):
    try:
        with open(path) as f:
            trace = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"profile-summary: cannot read the trace {path}: {e}")
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "python_function")
           and "dur" in e]
    if not ops:
        sys.exit(f"profile-summary: {path} holds no CPU operator events")
    return ops


def summarize(ops):
    """{kind: self milliseconds} and the step's wall milliseconds."""
    # The step's main thread: the one with the most operator time.
    by_thread = {}
    for e in ops:
        by_thread.setdefault(e["tid"], []).append(e)
    main = max(by_thread.values(), key=lambda es: sum(e["dur"] for e in es))
    main.sort(key=lambda e: (e["ts"], -e["dur"]))
    # Nesting on that thread: each event's parent and its children's time.
    parent, child_time, stack = {}, {}, []
    for i, e in enumerate(main):
        while stack and main[stack[-1]]["ts"] + main[stack[-1]]["dur"] <= e["ts"]:
            stack.pop()
        parent[i] = stack[-1] if stack else None
        if stack:
            child_time[stack[-1]] = child_time.get(stack[-1], 0.0) + e["dur"]
        stack.append(i)
    top = [i for i in range(len(main)) if parent[i] is None]
    backward = [i for i in top if "autograd::engine" in main[i]["name"] or "backward" in main[i]["name"].lower()]
    convs = [i for i in range(len(main)) if "conv" in main[i]["name"]]
    first_conv = main[convs[0]]["ts"] if convs else float("inf")
    last_backward_end = max((main[i]["ts"] + main[i]["dur"] for i in backward), default=float("inf"))

    def root(i):
        while parent[i] is not None:
            i = parent[i]
        return i

    totals = {k: 0.0 for k in ORDER}
    for i, e in enumerate(main):
        self_time = e["dur"] - child_time.get(i, 0.0)
        r = main[root(i)]
        if r["ts"] + r["dur"] <= first_conv and r["ts"] < first_conv:
            kind = "data"
        elif r["ts"] >= last_backward_end:
            kind = "optimizer"
        else:
            # The outermost named operator decides: a copy or a matrix
            # product inside a convolution is the convolution's time.
            chain, j = [], i
            while j is not None:
                chain.append(j)
                j = parent[j]
            kind = next((k for k in map(kind_of, (main[j]["name"] for j in reversed(chain))) if k), "other")
        totals[kind] += self_time / 1000
    start = min(e["ts"] for e in main)
    end = max(e["ts"] + e["dur"] for e in main)
    return totals, (end - start) / 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--json", help="also write the table to this file")
    args = ap.parse_args()
    columns = {path: summarize(load(path)) for path in args.traces}
    width = max(14, *(len(p) for p in args.traces))
    print(f"{'kind':16}" + "".join(f"{p:>{width}}  {'%':>5}" for p in args.traces))
    for kind in ORDER:
        cells = ""
        for totals, _ in columns.values():
            ms, all_ms = totals[kind], sum(totals.values())
            cells += f"{ms:{width}.1f}  {100 * ms / all_ms:5.1f}"
        print(f"{kind:16}{cells}")
    print(f"{'operators':16}" + "".join(f"{sum(t.values()):{width}.1f}  {100.0:5.1f}" for t, _ in columns.values()))
    print(f"{'step (wall)':16}" + "".join(f"{wall:{width}.1f}  {'':5}" for _, wall in columns.values()))
    print("milliseconds of self time on the step's main thread")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({p: {"kinds_ms": t, "step_ms": w} for p, (t, w) in columns.items()}, f, indent=1)


if __name__ == "__main__":
    main()
