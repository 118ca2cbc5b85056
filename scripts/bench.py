#!/usr/bin/env python3
"""Times tch-cifar against the PyTorch tutorial on the same data and device.

Runs, one after another (never in parallel, so they don't share the cores):
  1. `tch-cifar train` with the tutorial's recipe;
  2. the official tutorial in Python (DataLoader, num_workers=2);
  3. the same Python loop with the data preloaded in memory (no DataLoader);
  4. on CPU, `tch-cifar train --cpu-conv onednn`: libtorch's default
     convolution kernel, for the effect of `--cpu-conv auto`'s choice;
and then tch-cifar alone at batch sizes 4, 32, 128 and 512 (throughput only).
Each run's training wall time, images/s, test accuracy, evaluation time and
peak resident memory (from wait4's ru_maxrss) are printed as a table.

    scripts/bench --data-dir DIR [--device cpu|cuda] [--epochs 2] [--steps N]
                  [--skip-python] [--batch-sizes 4,32,128,512] [--json FILE]
                  [--binary PATH]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BINARY = os.path.join(ROOT, "target", "release", "tch-cifar")


def run_measured(cmd):
    """Like run, but reaps the child with wait4 to read its own peak RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    # ru_maxrss is in KiB on Linux. DataLoader workers are separate processes:
    # their memory is not in this figure.
    return summary, wall, rusage.ru_maxrss / 1024


def machine(device):
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.machine()}"
    if device.startswith("cuda"):
        import torch
        desc += f", GPU: {torch.cuda.get_device_name(0)}"
    return desc


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="CIFAR-10 binary batches")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="cap every run at this many mini-batches")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--skip-python", action="store_true", help="time tch-cifar only")
    ap.add_argument("--batch-sizes", default="4,32,128,512", help="throughput table ('' to skip)")
    ap.add_argument("--json", help="also write all results to this file")
    ap.add_argument("--binary", default=DEFAULT_BINARY,
                    help="the tch-cifar to time (default: the release build; scripts/device-bench passes its copy)")
    args = ap.parse_args()

    common = ["--epochs", str(args.epochs), "--device", args.device]
    steps = ["--max-steps", str(args.steps)] if args.steps else []
    out = os.path.join(ROOT, "target", "bench-weights.safetensors")
    runs = []

    def rust(batch_size, label, extra=()):
        cmd = [args.binary, "train", "--data-dir", args.data_dir, "--seed", str(args.seed), "--json",
               "--out", out, "--batch-size", str(batch_size), *common, *steps, *extra]
        s, wall, rss = run_measured(cmd)
        return {"name": label, "train_seconds": s["train_seconds"], "images_per_second": s["images_per_second"],
                "accuracy": s["accuracy"], "eval_seconds": s["eval_seconds"], "wall_seconds": wall,
                "peak_rss_mib": rss, "steps": s["steps"], "batch_size": batch_size,
                "threads": s["threads"], "cpu_conv": s["cpu_conv"]}

    def python(loader, label):
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "pytorch_tutorial.py"), "--data-dir", args.data_dir,
               "--loader", loader, "--seed", str(args.seed), "--json", *common]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        s, wall, rss = run_measured(cmd)
        return {"name": label, "train_seconds": s["train_seconds"], "images_per_second": s["images_per_second"],
                "accuracy": s["accuracy"], "eval_seconds": s["eval_seconds"], "wall_seconds": wall,
                "peak_rss_mib": rss, "steps": s["steps"], "batch_size": 4}

    print(f"machine: {machine(args.device)}", flush=True)
    print(f"recipe: batch 4, {args.epochs} epoch(s){f', at most {args.steps} steps' if args.steps else ''}, "
          f"device {args.device}", flush=True)
    runs.append(rust(4, "tch-cifar train"))
    print(f"  done: {runs[-1]['name']}", file=sys.stderr, flush=True)
    if not args.skip_python:
        runs.append(python("dataloader", "PyTorch tutorial (DataLoader)"))
        print(f"  done: {runs[-1]['name']}", file=sys.stderr, flush=True)
        runs.append(python("preloaded", "PyTorch, data preloaded"))
        print(f"  done: {runs[-1]['name']}", file=sys.stderr, flush=True)
    if args.device == "cpu":
        runs.append(rust(4, "tch-cifar, --cpu-conv onednn", ["--cpu-conv", "onednn"]))
        print(f"  done: {runs[-1]['name']}", file=sys.stderr, flush=True)

    header = f"{'run':32} {'train s':>8} {'images/s':>9} {'test acc':>9} {'eval s':>7} {'peak RSS':>9}"
    print(header)
    print("-" * len(header))
    for r in runs:
        print(f"{r['name']:32} {r['train_seconds']:8.2f} {r['images_per_second']:9.0f} {r['accuracy']:8.2f}% "
              f"{r['eval_seconds']:7.2f} {r['peak_rss_mib']:6.0f} MiB")
    if not args.skip_python:
        rust_run = runs[0]
        for r in runs[1:3]:
            print(f"tch-cifar vs {r['name']}: {r['train_seconds'] / rust_run['train_seconds']:.2f}x faster "
                  f"training, accuracy {rust_run['accuracy'] - r['accuracy']:+.2f} points")

    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    throughput = []
    for b in sizes:
        throughput.append(rust(b, f"tch-cifar batch {b}"))
        print(f"  done: batch {b}", file=sys.stderr, flush=True)
    if throughput:
        print(f"\n{'batch size':>10} {'steps':>7} {'train s':>8} {'images/s':>9} {'test acc':>9}  threads, conv")
        for r in throughput:
            print(f"{r['batch_size']:10} {r['steps']:7} {r['train_seconds']:8.2f} {r['images_per_second']:9.0f} "
                  f"{r['accuracy']:8.2f}%  {r['threads']}, {r['cpu_conv']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(args.device), "device": args.device, "epochs": args.epochs,
                       "steps": args.steps, "runs": runs, "throughput": throughput}, f, indent=1)


if __name__ == "__main__":
    main()
