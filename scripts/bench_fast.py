"""The fast recipes' benchmark (`scripts/bench --model airbench94` or
`--model airbench94-muon`): the PyTorch reference in each configuration
asked for (memory layout x allocator) against tch-cifar, per seed, on the
same data, threads, steps and precision (the reference under
torch.autocast), with each run's achieved GFLOP/s as a share of the
machine's measured float32 and bfloat16 matrix-multiply peaks
(scripts/peak.py)."""
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata

from bench import ROOT, run_measured
import peak as peak_module

RECORD_BYTES = 3073  # one label byte and a 3x32x32 image

# Per recipe: the reference script, its batch and its default epochs.
RECIPES = {
    "airbench94": {"script": "airbench94.py", "batch": 1024, "epochs": 9.9},
    "airbench94-muon": {"script": "airbench94_muon.py", "batch": 2000, "epochs": 8},
}
LAYOUTS = ["contiguous", "channels-last"]
# What tch-cifar sets for its built-in jemalloc (src/main.rs), given to the
# preloaded one too.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
ALLOCATORS = ["system", "jemalloc", "tcmalloc"]
# The Debian package and library of each preloadable allocator.
ALLOCATOR_LIBRARIES = {
    "jemalloc": ("libjemalloc2", "libjemalloc.so.2"),
    "tcmalloc": ("libtcmalloc-minimal4", "libtcmalloc_minimal.so.4"),
}


def training_flops_per_image(num_classes=10):
    """Floating-point operations of one training image through the airbench
    network, counted once from the layer shapes: 2 per multiply-add; the
    forward pass, and twice its work backward (the input's and the weights'
    gradients) for every layer but the frozen whitening convolution."""
    widths = [64, 256, 256]
    size = 32 - 1  # after the 2x2 whitening convolution, unpadded
    whiten = 24 * size * size * 3 * 2 * 2
    macs, channels = 0, 24
    for width in widths:
        macs += width * size * size * channels * 9  # conv1, 'same'
        size //= 2  # max-pool 2
        macs += width * size * size * width * 9  # conv2
        channels = width
    macs += widths[-1] * num_classes  # the head
    return 2 * (whiten + 3 * macs)


def native_bf16():
    """Whether the CPU multiplies bfloat16 natively (tch-cifar's test for
    its default precision): AVX512-BF16 or AMX-BF16 in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_precision(device):
    if device.startswith("cuda"):
        return "fp16"
    return "bf16" if native_bf16() else "fp32"


def train_images(data_dir):
    files = [os.path.join(data_dir, f"data_batch_{i}.bin") for i in range(1, 6)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        sys.exit(f"bench: {missing[0]} not found (--data-dir takes CIFAR-10 binary batches)")
    return sum(os.path.getsize(f) for f in files) // RECORD_BYTES


def allocator_library(name):
    """The path of `name`'s shared library to LD_PRELOAD: the system's if it
    has one, else extracted from its Debian package into target/allocators."""
    package, library = ALLOCATOR_LIBRARIES[name]
    for found in glob.glob(f"/usr/lib/*/{library}") + glob.glob(f"/usr/lib/{library}"):
        return found
    folder = os.path.join(ROOT, "target", "allocators", package)
    found = glob.glob(os.path.join(folder, "usr", "lib", "*", library))
    if found:
        return found[0]
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        sys.exit(f"bench: --reference-allocator {name} needs {library}: install the Debian package {package}")
    os.makedirs(folder, exist_ok=True)
    progress(f"fetching {package} (for {library}) into {folder}")
    got = subprocess.run(["apt-get", "download", package], cwd=folder, capture_output=True, text=True)
    debs = glob.glob(os.path.join(folder, f"{package}_*.deb"))
    if got.returncode != 0 or not debs:
        sys.exit(f"bench: apt-get download {package} failed:\n{got.stderr.strip()}")
    subprocess.run(["dpkg-deb", "-x", debs[0], folder], check=True)
    found = glob.glob(os.path.join(folder, "usr", "lib", "*", library))
    if not found:
        sys.exit(f"bench: {debs[0]} holds no {library}")
    return found[0]


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


def choices(text, allowed, flag):
    picked = [c.strip() for c in text.split(",") if c.strip()]
    wrong = [c for c in picked if c not in allowed]
    if wrong or not picked:
        sys.exit(f"bench: {flag} {text}: choose from {', '.join(allowed)} (comma-separated)")
    return picked


def run(args, machine_info, describe_machine):
    recipe = RECIPES[args.model]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        sys.exit(f"bench: --seeds {args.seeds}: give whole numbers separated by commas, such as 0,1")
    if not seeds:
        sys.exit("bench: --seeds names no seed")
    if args.epochs is not None and (args.epochs != int(args.epochs) or args.epochs < 1):
        sys.exit(f"bench: --epochs {args.epochs}: tch-cifar takes whole epochs (leave --epochs out for the "
                 f"recipe's {recipe['epochs']})")
    if args.threads is None or args.threads < 1:
        sys.exit("bench: --threads takes a number of threads, 1 or more")
    if args.steps is not None and args.steps < 1:
        sys.exit("bench: --steps takes a number of steps, 1 or more")
    layouts = choices(args.reference_layout, LAYOUTS, "--reference-layout")
    allocators = choices(args.reference_allocator, ALLOCATORS, "--reference-allocator")
    batch = recipe["batch"]
    epochs = recipe["epochs"] if args.epochs is None else int(args.epochs)
    steps_per_epoch = train_images(args.data_dir) // batch
    if steps_per_epoch == 0:
        sys.exit(f"bench: {args.data_dir} has fewer than {batch} training images, one mini-batch")
    expected_steps = math.ceil(steps_per_epoch * epochs)
    if args.steps:
        expected_steps = min(expected_steps, args.steps)
    precision = args.precision or default_precision(args.device)
    given_epochs = [] if args.epochs is None else ["--epochs", str(int(args.epochs))]
    steps = ["--max-steps", str(args.steps)] if args.steps else []
    common = ["--data-dir", args.data_dir, "--device", args.device, "--threads", str(args.threads),
              "--precision", precision, *given_epochs, *steps]
    weights_dir = tempfile.mkdtemp(prefix="tch-cifar-bench-")
    preload = {a: allocator_library(a) for a in allocators if a != "system"}

    def python(layout, allocator):
        def make(seed):
            cmd = [sys.executable, os.path.join(ROOT, "scripts", recipe["script"]), "--seed", str(seed), "--json",
                   *common, *(["--channels-last"] if layout == "channels-last" else []),
                   # A speed run: the reference's evaluation (minutes on a CPU) is not timed.
                   *(["--no-eval"] if args.steps else [])]
            env = dict(os.environ)
            if allocator != "system":
                env["LD_PRELOAD"] = preload[allocator]
            if allocator == "jemalloc":
                # tch-cifar's own setting: freed pages are kept, not returned.
                env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
            return cmd, env
        return make

    def tch(seed):
        return [args.binary, "train", "--model", args.model, "--seed", str(seed), "--json",
                "--out", os.path.join(weights_dir, "weights.safetensors"), *common], None

    # name -> (command maker, accuracy scale: the reference reports fractions)
    impls = {}
    if not args.skip_python:
        for layout in layouts:
            for allocator in allocators:
                impls[f"PyTorch {layout} {allocator}"] = (python(layout, allocator), 100.0)
    impls["tch-cifar"] = (tch, 1.0)
    names = list(impls)
    if args.order == "tch-first":
        names = names[-1:] + names[:-1]
    plan = [(name, seed) for seed in seeds for name in names]

    info = machine_info(args.device)
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "unknown"
    progress(f"measuring the matrix-multiply peak ({args.threads} threads)")
    peak = peak_module.peak(args.threads, device=args.device)
    flops = training_flops_per_image()
    settings = {"model": args.model, "device": args.device, "threads": args.threads, "epochs": epochs,
                "steps": expected_steps, "batch_size": batch, "seeds": seeds, "order": args.order,
                "dtype": precision, "reference_layouts": layouts, "reference_allocators": allocators,
                "preloaded": preload, "tch_memory_format": "channels-last", "tch_allocator": "jemalloc (built in)",
                "training_flops_per_image": flops, "peak": peak,
                "data_dir": os.path.abspath(args.data_dir), "torch": torch_version, "python": sys.executable,
                "binary": os.path.abspath(args.binary)}
    print(f"machine: {describe_machine(info)}", flush=True)
    kernels = ", ".join(f"{k} {v:.1f}" for k, v in peak.items() if k.startswith(("float32_", "bfloat16_")))
    print(f"peak: float32 {peak['float32']:.1f} GFLOP/s, bfloat16 {peak['bfloat16']:.1f} GFLOP/s "
          f"({peak['size']}^3 products, best of {peak['repeats']}, {args.threads} threads: {kernels})", flush=True)
    print(f"recipe: {args.model}, batch {batch}, {epochs} epoch(s), {expected_steps} steps, device {args.device}, "
          f"{args.threads} threads, {precision}, {flops / 1e9:.3f} GFLOP per training image; PyTorch {torch_version}",
          flush=True)

    runs = []

    def save(complete):
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": info, "settings": settings, "runs": runs, **results(runs, names),
                           "complete": complete}, f, indent=1)

    def measure(i, name, seed):
        make, scale = impls[name]
        cmd, env = make(seed)
        progress(f"[{i}/{len(plan)}] {time.strftime('%H:%M:%S')} starting {name}, seed {seed}: {' '.join(cmd)}")
        s, wall, rss = run_measured(cmd, echo_epochs, env=env)
        # Every epoch but a last partial one (9.9 epochs: the first 9 of 10).
        full = s["epoch_seconds"][: s["steps"] // steps_per_epoch] or s["epoch_seconds"]
        gflops = s["steps"] * batch * flops / s["train_seconds"] / 1e9
        run = {"name": name, "seed": seed, "steps": s["steps"], "train_seconds": s["train_seconds"],
               "seconds_per_step": s["seconds_per_step"], "epoch_seconds": s["epoch_seconds"],
               "full_epochs": len(full), "seconds_per_epoch": sum(full) / len(full),
               "gflops": gflops, "peak_fraction": gflops / peak["float32"],
               "bf16_peak_fraction": gflops / peak["bfloat16"],
               # tch-cifar's `accuracy` is the TTA one it reports; `plain_accuracy` is without.
               "accuracy": scaled(s.get("plain_accuracy", s["accuracy"]), scale),
               "tta_accuracy": scaled(s["tta_accuracy"], scale),
               "eval_seconds": s["eval_seconds"], "wall_seconds": wall, "peak_rss_mib": rss,
               "threads": s.get("threads"), "command": cmd,
               "ld_preload": (env or {}).get("LD_PRELOAD"), "malloc_conf": (env or {}).get("MALLOC_CONF"),
               "summary": {k: v for k, v in s.items() if k not in ("confusion", "per_class_accuracy")}}
        progress(f"  done: {name}, seed {seed}: {run['steps']} steps, {run['train_seconds']:.1f} s of training "
                 f"({run['seconds_per_step']:.3f} s/step, {gflops:.0f} GFLOP/s), accuracy "
                 f"{percent(run['accuracy'])}, {percent(run['tta_accuracy'])} with TTA, {wall:.1f} s wall")
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

    print(f"both sides in {precision}; % of peak: float32's, then bfloat16's")
    header = (f"{'run':34} {'seed':>4} {'steps':>5} {'train s':>8} {'s/step':>7} {'GFLOP/s':>8} {'% fp32':>6} "
              f"{'% bf16':>6} {'acc':>7} {'TTA acc':>8} {'eval s':>7} {'peak RSS':>9}")
    print(header)
    print("-" * len(header))

    def row(label, seed, r):
        print(f"{label:34} {seed:>4} {r['steps']:5.0f} {r['train_seconds']:8.2f} {r['seconds_per_step']:7.3f} "
              f"{r['gflops']:8.1f} {100 * r['peak_fraction']:5.1f}% {100 * r['bf16_peak_fraction']:5.1f}% "
              f"{percent(r['accuracy']):>7} "
              f"{percent(r['tta_accuracy']):>8} {r['eval_seconds']:7.2f} {r['peak_rss_mib']:5.0f} MiB")

    for r in runs:
        row(r["name"], r["seed"], r)
    out = results(runs, names)
    for name, mean in out["means"].items():
        row(f"{name} mean", "", mean)
    for name, ratio in out.get("ratios_seconds_per_step", {}).items():
        difference = out["tta_accuracy_differences"][name]
        accuracy = "" if difference is None else f"; TTA accuracy, tch-cifar - {name}: {difference:+.2f} points"
        print(f"{name} s/step / tch-cifar s/step: {ratio:.2f} "
              f"(tch-cifar {'faster' if ratio > 1 else 'slower'} by {max(ratio, 1 / ratio):.2f}x){accuracy}")
    save(complete=len(runs) == len(plan))
    if len(runs) < len(plan):
        sys.exit(1)


def interrupt(signum, frame):
    # `timeout` signals the process and then its group: the second one
    # would cut the table short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def results(runs, names):
    """The means per configuration over the seeds run so far, and each
    PyTorch configuration's s/step over tch-cifar's and TTA accuracy
    difference (tch-cifar's minus its) in points."""
    fields = ["steps", "train_seconds", "seconds_per_step", "seconds_per_epoch", "gflops", "peak_fraction",
              "bf16_peak_fraction",
              "accuracy", "tta_accuracy", "eval_seconds", "wall_seconds", "peak_rss_mib"]
    means = {}
    for name in names:
        mine = [r for r in runs if r["name"] == name]
        if mine:
            # A speed run's reference has no accuracy: its mean is None.
            means[name] = {k: None if None in (v := [r[k] for r in mine]) else sum(v) / len(v) for k in fields}
            means[name]["runs"] = len(mine)
    out = {"means": means}
    if "tch-cifar" in means:
        tch = means["tch-cifar"]
        others = [n for n in means if n != "tch-cifar"]
        out["ratios_seconds_per_step"] = {n: means[n]["seconds_per_step"] / tch["seconds_per_step"] for n in others}
        out["tta_accuracy_differences"] = {
            n: None if None in (tch["tta_accuracy"], means[n]["tta_accuracy"])
            else tch["tta_accuracy"] - means[n]["tta_accuracy"] for n in others}
    return out


def scaled(value, scale):
    return None if value is None else value * scale


def percent(value):
    return "-" if value is None else f"{value:.2f}%"
