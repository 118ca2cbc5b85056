#!/usr/bin/env python3
"""Times tch-cifar against PyTorch on the same data and device.

By default (--model net), the tutorial's recipe. 
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

With --model airbench94 or airbench94-muon it times a fast recipe instead
(scripts/bench_fast.py): for each seed, the PyTorch reference
(scripts/airbench94.py, scripts/airbench94_muon.py) in every configuration
asked for (memory layout x allocator, the allocator LD_PRELOADed from its
Debian package) and `tch-cifar train --model ...`, one after the other, with
the same seed, epochs, steps, threads and data. It measures the machine's
matrix-multiply peak first (scripts/peak.py) and prints each run's training
time, seconds per step, achieved GFLOP/s and its share of the float32 and
bfloat16 peaks (both sides in the same --precision),
accuracy with and without TTA, evaluation time and peak RSS, the means over
the seeds and each PyTorch configuration's s/step over tch-cifar's:

    scripts/bench --model airbench94-muon --data-dir DIR [--seeds 0,1] [--epochs N]
                  [--steps N] [--threads T] [--device cpu|cuda]
                  [--reference-layout contiguous,channels-last]
                  [--reference-allocator system,jemalloc,tcmalloc] [--precision fp32|bf16|fp16]
                  [--order python-first|tch-first] [--skip-python] [--json FILE]
"""
import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BINARY = os.path.join(ROOT, "target", "release", "tch-cifar")


def run_measured(cmd, on_line=None, env=None):
    """Runs cmd (in env, when given), reaping it with wait4 to read its own
    peak RSS. Returns its last JSON line (the summary), its wall time and
    peak RSS in MiB. Each line of its stdout goes to on_line as it comes,
    when given."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # stderr is drained on its own thread, so a chatty child can't block on it.
    err = []
    drain = threading.Thread(target=lambda: err.append(proc.stderr.read()))
    drain.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if on_line:
                on_line(line)
    except BaseException:  # interrupted: don't leave the child running
        proc.kill()
        raise
    drain.join()
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode in (-signal.SIGINT, -signal.SIGTERM):
        raise KeyboardInterrupt  # the child was stopped with the bench
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed ({proc.returncode}):\n{''.join(err)}")
    summary = json.loads([line for line in lines if line.startswith("{")][-1])
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
    ap.add_argument("--model", choices=["net", "airbench94", "airbench94-muon"], default="net",
                    help="net: the tutorial's recipe (default); airbench94, airbench94-muon: the fast recipes")
    ap.add_argument("--data-dir", required=True, help="CIFAR-10 binary batches")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=float, default=None,
                    help="passes over the training set (net: 2; the fast recipes: their own 9.9 or 8, or N whole "
                         "epochs)")
    ap.add_argument("--steps", type=int, default=None,
                    help="cap every run at this many mini-batches (the fast recipes keep their schedule)")
    ap.add_argument("--seed", type=int, default=1, help="net: the seed of every run")
    ap.add_argument("--seeds", default="0,1", help="fast recipes: one run per configuration and seed")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="fast recipes: torch threads of both implementations (default: every core)")
    ap.add_argument("--reference-layout", default="channels-last",
                    help="fast recipes: the PyTorch reference's memory layouts, comma-separated: contiguous, "
                         "channels-last (default: channels-last)")
    ap.add_argument("--reference-allocator", default="jemalloc",
                    help="fast recipes: the PyTorch reference's allocators, comma-separated: system (glibc), "
                         "jemalloc, tcmalloc (LD_PRELOADed; default: jemalloc)")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                    help="fast recipes: both sides' precision, the reference under torch.autocast (default: "
                         "tch-cifar's, bf16 on a CPU with AVX512-BF16 or AMX, else fp32; fp16 on CUDA)")
    ap.add_argument("--order", choices=["python-first", "tch-first"], default="python-first",
                    help="fast recipes: which implementation runs first for each seed")
    ap.add_argument("--skip-python", action="store_true", help="time tch-cifar only")
    ap.add_argument("--batch-sizes", default="4,32,128,512", help="net: throughput table ('' to skip)")
    ap.add_argument("--json", help="also write all results to this file")
    ap.add_argument("--binary", default=DEFAULT_BINARY,
                    help="the tch-cifar to time (default: the release build; scripts/device-bench passes its copy)")
    args = ap.parse_args()
    if args.model != "net":
        import bench_fast
        bench_fast.run(args, machine_info, describe_machine)
    else:
        if args.epochs is None:
            args.epochs = 2
        elif args.epochs != int(args.epochs):
            ap.error(f"--epochs {args.epochs}: the tutorial's recipe trains whole epochs")
        args.epochs = int(args.epochs)
        tutorial(args)


def tutorial(args):
    """The tutorial's recipe: tch-cifar against the PyTorch tutorial, then
    tch-cifar's throughput by batch size."""
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

    throughput = []

    def done(label):
        """Reports a finished run and rewrites the JSON file, so a cut bench
        keeps what it measured."""
        print(f"  done: {label}", file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine(args.device), "device": args.device, "epochs": args.epochs,
                           "steps": args.steps, "runs": runs, "throughput": throughput}, f, indent=1)

    print(f"machine: {machine(args.device)}", flush=True)
    print(f"recipe: batch 4, {args.epochs} epoch(s){f', at most {args.steps} steps' if args.steps else ''}, "
          f"device {args.device}", flush=True)
    runs.append(rust(4, "tch-cifar train"))
    done(runs[-1]["name"])
    if not args.skip_python:
        runs.append(python("dataloader", "PyTorch tutorial (DataLoader)"))
        done(runs[-1]["name"])
        runs.append(python("preloaded", "PyTorch, data preloaded"))
        done(runs[-1]["name"])
    if args.device == "cpu":
        runs.append(rust(4, "tch-cifar, --cpu-conv onednn", ["--cpu-conv", "onednn"]))
        done(runs[-1]["name"])

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
    for b in sizes:
        throughput.append(rust(b, f"tch-cifar batch {b}"))
        done(f"batch {b}")
    if throughput:
        print(f"\n{'batch size':>10} {'steps':>7} {'train s':>8} {'images/s':>9} {'test acc':>9}  threads, conv")
        for r in throughput:
            print(f"{r['batch_size']:10} {r['steps']:7} {r['train_seconds']:8.2f} {r['images_per_second']:9.0f} "
                  f"{r['accuracy']:8.2f}%  {r['threads']}, {r['cpu_conv']}")


# ------------------------------------------------------------- the machine


def machine_info(device):
    """The machine, for the table and the JSON file: CPU model, cores,
    memory and GPUs (nvidia-smi's names, or torch's when it has none)."""
    info = {"cpu": "unknown CPU", "cores": os.cpu_count(), "memory_gib": None, "gpu": None,
            "os": f"{platform.system()} {platform.release()} {platform.machine()}"}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True)
        gpus = [line.strip() for line in smi.stdout.splitlines() if line.strip()]
        info["gpu"] = "; ".join(gpus) or None
    if info["gpu"] is None and device.startswith("cuda"):
        import torch
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe_machine(info):
    memory = f"{info['memory_gib']} GiB" if info["memory_gib"] else "unknown memory"
    return f"{info['cpu']}, {info['cores']} cores, {memory}, GPU: {info['gpu'] or 'none'}, {info['os']}"


if __name__ == "__main__":
    main()
