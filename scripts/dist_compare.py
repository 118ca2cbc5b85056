"""One process against the same run on N ranks under torchrun, same seed.

    scripts/dist-compare --data-dir DIR [--ranks 2] [--part tutorial,airbench94]

For the tutorial's recipe (global batch 4): the largest parameter difference
after the first 100 steps, every running-loss line side by side, the test
accuracies and the time per step. For airbench94 (--epochs 2, or
--airbench-epochs): the accuracies with and without test-time augmentation
and the time per step. Every process has one CPU thread (--threads 1), so
the ranks share the machine's cores as the one process does not. Prints a
table per part; --json FILE keeps the figures.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def run(cmd, log):
    """Runs cmd, its stdout (JSON lines) returned as events, stderr to log."""
    began = time.monotonic()
    with open(log, "w") as err:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    wall = time.monotonic() - began
    if out.returncode != 0:
        tail = "".join(open(log).readlines()[-10:])
        sys.exit(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{tail}")
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return events, wall


def torchrun(ranks, port):
    return [
        str(ROOT / ".venv/bin/torchrun"), "--nnodes", "1", "--nproc-per-node", str(ranks),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--no-python",
    ]


def of(events, kind):
    return [e for e in events if e["event"] == kind]


def max_difference(a, b):
    a, b = load_file(a), load_file(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def seconds_per_step(events):
    s = of(events, "summary")[0]
    return s["train_seconds"] / s["steps"]


def tutorial(args, work, report):
    base = [args.binary, "train", "--data-dir", args.data_dir, "--device", "cpu", "--threads", "1",
            "--seed", str(args.seed), "--batch-size", "4", "--json"]
    port = args.port
    print(f"tutorial: 100 steps, 1 process and {args.ranks} ranks", file=sys.stderr)
    run(base + ["--max-steps", "100", "--out", work / "one100.safetensors"], work / "one100.log")
    run(torchrun(args.ranks, port) + base + ["--max-steps", "100", "--out", work / "dist100.safetensors"],
        work / "dist100.log")
    diff100 = max_difference(work / "one100.safetensors", work / "dist100.safetensors")
    print("tutorial: 2 epochs, 1 process", file=sys.stderr)
    one, _ = run(base + ["--out", work / "one.safetensors"], work / "one.log")
    print(f"tutorial: 2 epochs, {args.ranks} ranks", file=sys.stderr)
    dist, _ = run(torchrun(args.ranks, port + 1) + base + ["--out", work / "dist.safetensors"],
                  work / "dist.log")
    lines = list(zip(of(one, "loss"), of(dist, "loss")))
    print(f"\ntutorial's recipe, global batch 4, seed {args.seed}: 1 process against {args.ranks} ranks")
    print(f"largest parameter difference after 100 steps: {diff100:.3e}")
    print(f"{'line':>12} {'1 process':>10} {f'{args.ranks} ranks':>10} {'difference':>11}")
    for a, b in lines:
        print(f"[{a['epoch']}, {a['step']:5}] {a['loss']:10.3f} {b['loss']:10.3f} {b['loss'] - a['loss']:+11.4f}")
    acc = (of(one, "summary")[0]["accuracy"], of(dist, "summary")[0]["accuracy"])
    sps = (seconds_per_step(one), seconds_per_step(dist))
    print(f"test accuracy: {acc[0]:.2f} % and {acc[1]:.2f} % ({acc[1] - acc[0]:+.2f} points)")
    print(f"s/step: {sps[0] * 1e3:.3f} ms and {sps[1] * 1e3:.3f} ms")
    report["tutorial"] = {
        "max_difference_100_steps": diff100,
        "lines": [[a["epoch"], a["step"], a["loss"], b["loss"]] for a, b in lines],
        "accuracy": acc, "seconds_per_step": sps,
    }


def airbench(args, work, report):
    base = [args.binary, "train", "--model", "airbench94", "--data-dir", args.data_dir,
            "--device", "cpu", "--threads", "1", "--seed", str(args.seed),
            "--epochs", str(args.airbench_epochs), "--json"]
    print(f"airbench94: {args.airbench_epochs} epochs, 1 process", file=sys.stderr)
    one, _ = run(base + ["--out", work / "ab-one.safetensors"], work / "ab-one.log")
    print(f"airbench94: {args.airbench_epochs} epochs, {args.ranks} ranks", file=sys.stderr)
    dist, _ = run(torchrun(args.ranks, args.port + 2) + base + ["--out", work / "ab-dist.safetensors"],
                  work / "ab-dist.log")
    s1, s2 = of(one, "summary")[0], of(dist, "summary")[0]
    print(f"\nairbench94, --epochs {args.airbench_epochs}, seed {args.seed}: 1 process against {args.ranks} ranks")
    print(f"{'':>10} {'TTA':>8} {'plain':>8} {'s/step':>8} {'train s':>8}")
    for name, s in [("1 process", s1), (f"{args.ranks} ranks", s2)]:
        print(f"{name:>10} {s['tta_accuracy']:7.2f}% {s['plain_accuracy']:7.2f}% "
              f"{s['seconds_per_step']:8.3f} {s['train_seconds']:8.1f}")
    print(f"TTA difference: {s2['tta_accuracy'] - s1['tta_accuracy']:+.2f} points")
    report["airbench94"] = {
        "one": {k: s1[k] for k in ["tta_accuracy", "plain_accuracy", "seconds_per_step", "train_seconds"]},
        "dist": {k: s2[k] for k in ["tta_accuracy", "plain_accuracy", "seconds_per_step", "train_seconds"]},
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--binary", default=str(ROOT / "target/release/tch-cifar"))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--airbench-epochs", type=int, default=2)
    p.add_argument("--part", default="tutorial,airbench94")
    p.add_argument("--port", type=int, default=29531, help="first of three loopback ports")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = {"ranks": args.ranks, "seed": args.seed}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        parts = args.part.split(",")
        if "tutorial" in parts:
            tutorial(args, work, report)
        if "airbench94" in parts:
            airbench(args, work, report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
