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

With --model airbench94 it times the fast recipe instead: for each seed, the
PyTorch reference (scripts/airbench94.py) and `tch-cifar train --model
airbench94`, one after the other, with the same seed, epochs, threads and
data, and prints each run's training time, seconds per step, seconds per
full epoch, accuracy with and without TTA, evaluation time and peak RSS,
the means over the seeds and the ratio of the two implementations' s/step:

    scripts/bench --model airbench94 --data-dir DIR [--seeds 0,1] [--epochs N]
                  [--threads T] [--device cpu|cuda] [--python-channels-last]
                  [--order python-first|tch-first] [--skip-python] [--json FILE]
"""
import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BINARY = os.path.join(ROOT, "target", "release", "tch-cifar")


def run_measured(cmd, on_line=None):
    """Runs cmd, reaping it with wait4 to read its own peak RSS. Returns its
    last JSON line (the summary), its wall time and peak RSS in MiB. Each
    line of its stdout goes to on_line as it comes, when given."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    ap.add_argument("--model", choices=["net", "airbench94"], default="net",
                    help="net: the tutorial's recipe (default); airbench94: the fast recipe")
    ap.add_argument("--data-dir", required=True, help="CIFAR-10 binary batches")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=float, default=None,
                    help="passes over the training set (net: 2; airbench94: the recipe's 9.9, or N whole epochs)")
    ap.add_argument("--steps", type=int, default=None, help="net: cap every run at this many mini-batches")
    ap.add_argument("--seed", type=int, default=1, help="net: the seed of every run")
    ap.add_argument("--seeds", default="0,1", help="airbench94: one Python and one tch-cifar run per seed")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="airbench94: torch threads of both implementations (default: every core)")
    ap.add_argument("--python-channels-last", action="store_true",
                    help="airbench94: run the PyTorch reference in channels-last (default: contiguous)")
    ap.add_argument("--order", choices=["python-first", "tch-first"], default="python-first",
                    help="airbench94: which implementation runs first for each seed")
    ap.add_argument("--skip-python", action="store_true", help="time tch-cifar only")
    ap.add_argument("--batch-sizes", default="4,32,128,512", help="net: throughput table ('' to skip)")
    ap.add_argument("--json", help="also write all results to this file")
    ap.add_argument("--binary", default=DEFAULT_BINARY,
                    help="the tch-cifar to time (default: the release build; scripts/device-bench passes its copy)")
    args = ap.parse_args()
    if args.model == "airbench94":
        airbench94(args)
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


# ------------------------------------------------------------------ airbench94

AIRBENCH_EPOCHS = 9.9  # the recipe's default, in both implementations
AIRBENCH_BATCH = 1024
RECORD_BYTES = 3073  # one label byte and a 3x32x32 image


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


def train_images(data_dir):
    """The number of training images in the binary batches."""
    files = [os.path.join(data_dir, f"data_batch_{i}.bin") for i in range(1, 6)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        sys.exit(f"bench: {missing[0]} not found (--data-dir takes CIFAR-10 binary batches)")
    return sum(os.path.getsize(f) for f in files) // RECORD_BYTES


def progress(text):
    print(text, file=sys.stderr, flush=True)


def echo_epochs(line):
    """Relays a run's epoch events to stderr, so a long bench can be watched."""
    try:
        event = json.loads(line)
    except ValueError:
        return
    if isinstance(event, dict) and event.get("event") == "epoch":
        progress(f"    epoch {event['epoch']:2}  step {event['step']:4}  train loss {event['train_loss']:.4f}  "
                 f"{event['seconds']:.1f} s")


def airbench94(args):
    """The fast recipe: the PyTorch reference against tch-cifar, per seed."""
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        sys.exit(f"bench: --seeds {args.seeds}: give whole numbers separated by commas, such as 0,1")
    if not seeds:
        sys.exit("bench: --seeds names no seed")
    if args.epochs is not None and (args.epochs != int(args.epochs) or args.epochs < 1):
        sys.exit(f"bench: --epochs {args.epochs}: tch-cifar takes whole epochs (leave --epochs out for the "
                 f"recipe's {AIRBENCH_EPOCHS})")
    if args.threads is None or args.threads < 1:
        sys.exit("bench: --threads takes a number of threads, 1 or more")
    epochs = AIRBENCH_EPOCHS if args.epochs is None else int(args.epochs)
    steps_per_epoch = train_images(args.data_dir) // AIRBENCH_BATCH
    if steps_per_epoch == 0:
        sys.exit(f"bench: {args.data_dir} has fewer than {AIRBENCH_BATCH} training images, one mini-batch")
    expected_steps = math.ceil(steps_per_epoch * epochs)
    given_epochs = [] if args.epochs is None else ["--epochs", str(int(args.epochs))]
    common = ["--data-dir", args.data_dir, "--device", args.device, "--threads", str(args.threads), *given_epochs]
    python_format = "channels-last" if args.python_channels_last else "contiguous"
    weights_dir = tempfile.mkdtemp(prefix="tch-cifar-bench-")

    def python_cmd(seed):
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "airbench94.py"), "--seed", str(seed), "--json", *common]
        return cmd + (["--channels-last"] if args.python_channels_last else [])

    def tch_cmd(seed):
        return [args.binary, "train", "--model", "airbench94", "--seed", str(seed), "--json",
                "--out", os.path.join(weights_dir, "airbench94.safetensors"), *common]

    # (implementation, command, accuracy scale: the reference reports fractions)
    impls = {"PyTorch": (python_cmd, 100.0), "tch-cifar": (tch_cmd, 1.0)}
    names = ["tch-cifar"] if args.skip_python else ["PyTorch", "tch-cifar"]
    if args.order == "tch-first":
        names.reverse()
    plan = [(name, seed) for seed in seeds for name in names]

    info = machine_info(args.device)
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "unknown"
    settings = {"model": "airbench94", "device": args.device, "threads": args.threads, "epochs": epochs,
                "steps": expected_steps, "batch_size": AIRBENCH_BATCH, "seeds": seeds, "order": args.order,
                "dtype": "fp32", "python_memory_format": python_format, "tch_memory_format": "channels-last",
                "data_dir": os.path.abspath(args.data_dir), "torch": torch_version, "python": sys.executable,
                "binary": os.path.abspath(args.binary)}
    print(f"machine: {describe_machine(info)}", flush=True)
    print(f"recipe: airbench94, batch {AIRBENCH_BATCH}, {epochs} epoch(s) ({expected_steps} steps), device "
          f"{args.device}, {args.threads} threads, fp32; PyTorch {torch_version} in {python_format}, tch-cifar "
          f"in channels-last", flush=True)

    runs = []

    def save(complete):
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": info, "settings": settings, "runs": runs, **results(runs, names),
                           "complete": complete}, f, indent=1)

    # A SIGTERM (from `timeout`, say) ends the bench like Ctrl-C: with the
    # table and the JSON of the runs that finished.
    def measure(i, name, seed):
        make_cmd, scale = impls[name]
        cmd = make_cmd(seed)
        progress(f"[{i}/{len(plan)}] {time.strftime('%H:%M:%S')} starting {name}, seed {seed}: {' '.join(cmd)}")
        s, wall, rss = run_measured(cmd, echo_epochs)
        # Every epoch but a last partial one (9.9 epochs: the first 9 of 10).
        full = s["epoch_seconds"][: s["steps"] // steps_per_epoch] or s["epoch_seconds"]
        run = {"name": name, "seed": seed, "steps": s["steps"], "train_seconds": s["train_seconds"],
               "seconds_per_step": s["seconds_per_step"], "epoch_seconds": s["epoch_seconds"],
               "full_epochs": len(full), "seconds_per_epoch": sum(full) / len(full),
               # tch-cifar's `accuracy` is the TTA one it reports; `plain_accuracy` is without.
               "accuracy": s.get("plain_accuracy", s["accuracy"]) * scale,
               "tta_accuracy": s["tta_accuracy"] * scale,
               "eval_seconds": s["eval_seconds"], "wall_seconds": wall, "peak_rss_mib": rss,
               "threads": s.get("threads"), "command": cmd,
               "summary": {k: v for k, v in s.items() if k not in ("confusion", "per_class_accuracy")}}
        progress(f"  done: {name}, seed {seed}: {run['steps']} steps, {run['train_seconds']:.1f} s of training "
                 f"({run['seconds_per_step']:.3f} s/step), accuracy {run['accuracy']:.2f} %, "
                 f"{run['tta_accuracy']:.2f} % with TTA, {wall:.1f} s wall")
        return run

    # A SIGTERM (from `timeout`, say) ends the bench like Ctrl-C: with the
    # table and the JSON of the runs that finished.
    signal.signal(signal.SIGTERM, interrupt)
    try:
        for i, (name, seed) in enumerate(plan, 1):
            runs.append(measure(i, name, seed))
            save(complete=False)
    except KeyboardInterrupt:
        progress(f"bench: interrupted; the table has the {len(runs)} of {len(plan)} runs that finished")
    shutil.rmtree(weights_dir, ignore_errors=True)
    if not runs:
        sys.exit(1)

    header = (f"{'run':16} {'seed':>4} {'steps':>5} {'train s':>8} {'s/step':>7} {'s/epoch':>8} {'acc':>7} "
              f"{'TTA acc':>8} {'eval s':>7} {'peak RSS':>9}")
    print(header)
    print("-" * len(header))

    def row(label, seed, r):
        print(f"{label:16} {seed:>4} {r['steps']:5.0f} {r['train_seconds']:8.2f} {r['seconds_per_step']:7.3f} "
              f"{r['seconds_per_epoch']:8.2f} {r['accuracy']:6.2f}% {r['tta_accuracy']:7.2f}% "
              f"{r['eval_seconds']:7.2f} {r['peak_rss_mib']:5.0f} MiB")

    for r in runs:
        row(r["name"], r["seed"], r)
    out = results(runs, names)
    for name, mean in out["means"].items():
        row(f"{name} mean", "", mean)
    if "ratio_seconds_per_step" in out:
        ratio = out["ratio_seconds_per_step"]
        print(f"PyTorch s/step / tch-cifar s/step: {ratio:.2f} "
              f"(tch-cifar {'faster' if ratio > 1 else 'slower'} per step by {max(ratio, 1 / ratio):.2f}x)")
        print(f"PyTorch s/epoch / tch-cifar s/epoch: {out['ratio_seconds_per_epoch']:.2f} (full epochs only, "
              f"without the set-up before the first step)")
        print(f"TTA accuracy, tch-cifar mean - PyTorch mean: {out['tta_accuracy_difference']:+.2f} points")
    save(complete=len(runs) == len(plan))
    if len(runs) < len(plan):
        sys.exit(1)


def interrupt(signum, frame):
    # `timeout` signals the process and then its group: the second one
    # would cut the table short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def results(runs, names):
    """The means per implementation over the seeds run so far, and the
    comparisons: PyTorch's s/step and s/epoch over tch-cifar's, and the
    difference of the TTA accuracies in points."""
    fields = ["steps", "train_seconds", "seconds_per_step", "seconds_per_epoch", "accuracy", "tta_accuracy",
              "eval_seconds", "wall_seconds", "peak_rss_mib"]
    means = {}
    for name in names:
        mine = [r for r in runs if r["name"] == name]
        if mine:
            means[name] = {k: sum(r[k] for r in mine) / len(mine) for k in fields}
            means[name]["runs"] = len(mine)
    out = {"means": means}
    if "PyTorch" in means and "tch-cifar" in means:
        out["ratio_seconds_per_step"] = means["PyTorch"]["seconds_per_step"] / means["tch-cifar"]["seconds_per_step"]
        out["ratio_seconds_per_epoch"] = means["PyTorch"]["seconds_per_epoch"] / means["tch-cifar"]["seconds_per_epoch"]
        out["tta_accuracy_difference"] = means["tch-cifar"]["tta_accuracy"] - means["PyTorch"]["tta_accuracy"]
    return out


if __name__ == "__main__":
    main()
