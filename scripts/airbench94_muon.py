#!/usr/bin/env python3
"""A PyTorch reference for tch-cifar's record recipe: airbench94-muon (Keller
Jordan's airbench94_muon.py, 94 % in 8 epochs), reading the same binary
batches as tch-cifar, for side-by-side runs on the same machine and data.

    airbench94_muon.py --data-dir DIR [--epochs 8] [--seed 0] [--device cpu]
                       [--threads N] [--channels-last] [--max-steps N] [--precision fp32|bf16|fp16]
                       [--ns-dtype bfloat16|float32] [--no-eval] [--profile TRACE] [--save net.pth] [--json]

What differs from airbench94 (scripts/airbench94.py, whose data pipeline,
network and evaluation this reuses):
* data: mini-batches of 2000 (25 per epoch), 8 epochs;
* net: the same modules and state_dict keys; the logits are scaled by 1/256
  (1/width) instead of 1/9, the head's initial weights by 1/std, the
  whitening bias keeps PyTorch's default init (airbench94 zeroes it), and the
  whitening filters keep eigh's ascending order;
* optimizers, one step each after every backward:
  - Nesterov SGD (momentum 0.85) for the whitening bias and the BatchNorm
    biases (lr 0.053) and the head (lr 0.67), each with weight decay
    0.004 / lr; the whitening bias's rate falls linearly to 0 over the first
    3 epochs (and it stops training there), the others' over the whole run;
  - Muon for the six convolution filters (lr 0.24, Nesterov momentum 0.6, the
    same linear decay): each filter is rescaled to norm sqrt(out_channels),
    then moved by the 3-step quintic Newton-Schulz orthogonalization of its
    momentum-smoothed gradient, in bfloat16 (--ns-dtype);
* no lookahead EMA.

The last line of output is a JSON summary (with --json, every event is JSON).
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

import airbench94 as ab

EPOCHS = 8
BATCH_SIZE = 2000
BIAS_LR = 0.053
HEAD_LR = 0.67
WEIGHT_DECAY = 2e-6 * BATCH_SIZE
SGD_MOMENTUM = 0.85
MUON_LR = 0.24
MUON_MOMENTUM = 0.6
NS_STEPS = 3
WHITEN_BIAS_EPOCHS = 3


def newton_schulz(g, steps=NS_STEPS, eps=1e-7, dtype=torch.bfloat16):
    """The quintic Newton-Schulz iteration towards the orthogonal factor of
    the 2-d `g` (U V^T of its SVD, its singular values pushed into ~[0.7, 1.2])."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = g.to(dtype)
    x /= x.norm() + eps  # the top singular value <= 1
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        t = b * s + c * s @ s
        x = a * x + t @ x
    if tall:
        x = x.T
    return x


class Muon(torch.optim.Optimizer):
    """Momentum, then the Newton-Schulz orthogonalization of each filter's
    update, after the filter is normalized to norm sqrt(out_channels)."""

    def __init__(self, params, lr, momentum, ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(p.grad)
                g = p.grad.add(buf, alpha=momentum)  # Nesterov
                p.mul_(len(p) ** 0.5 / p.norm())
                update = newton_schulz(g.reshape(len(g), -1), dtype=self.ns_dtype).view(g.shape)
                p.add_(update, alpha=-lr)


def make_optimizers(net, ns_dtype):
    filters = [p for p in net.parameters() if p.dim() == 4 and p.requires_grad]
    norm_biases = [p for k, p in net.named_parameters() if "norm" in k and p.requires_grad]
    groups = [
        dict(params=[net.whiten.bias], lr=BIAS_LR, weight_decay=WEIGHT_DECAY / BIAS_LR),
        dict(params=norm_biases, lr=BIAS_LR, weight_decay=WEIGHT_DECAY / BIAS_LR),
        dict(params=[net.head.weight], lr=HEAD_LR, weight_decay=WEIGHT_DECAY / HEAD_LR),
    ]
    sgd = torch.optim.SGD(groups, momentum=SGD_MOMENTUM, nesterov=True)
    muon = Muon(filters, lr=MUON_LR, momentum=MUON_MOMENTUM, ns_dtype=ns_dtype)
    for opt in (sgd, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return sgd, muon


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder of CIFAR-10 binary batches")
    parser.add_argument("--epochs", type=float, default=EPOCHS, help="passes over the training set (8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (the schedule is unchanged)")
    parser.add_argument("--ns-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="Newton-Schulz's precision (bfloat16, as the original)")
    parser.add_argument("--no-eval", action="store_true", help="skip the test-set evaluation (speed runs)")
    parser.add_argument("--profile", help="record one step with torch.profiler into this Chrome trace")
    parser.add_argument("--profile-step", type=int, default=3, help="the step --profile records (3)")
    parser.add_argument("--save", help="write the trained state_dict here (torch.save)")
    parser.add_argument("--json", action="store_true", help="every event as a JSON line")
    ab.add_precision_argument(parser)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision_name = ab.set_precision(args.precision, device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def emit(text, event):
        print(json.dumps(event) if args.json else text, flush=True)

    train_images, train_labels = ab.read_batches(args.data_dir, ab.TRAIN_FILES)
    test_images, test_labels = ab.read_batches(args.data_dir, [ab.TEST_FILE])
    train_images, test_images = ab.normalize(train_images.to(device)), ab.normalize(test_images.to(device))
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)

    net = ab.Airbench94(scale=1 / ab.WIDTHS[2])
    # airbench94_muon.py's reset(): the whitening convolution keeps its default
    # init (its weight is replaced by the whitening filters below, its bias
    # stays), and the head is scaled to unit std.
    net.whiten.reset_parameters()
    with torch.no_grad():
        net.head.weight *= 1 / net.head.weight.std()
    net = net.to(device).to(memory_format=memory_format)
    batches = ab.TrainBatches(train_images, train_labels, generator, batch_size=BATCH_SIZE)
    total_steps = math.ceil(batches.steps_per_epoch * args.epochs)
    whiten_bias_steps = math.ceil(batches.steps_per_epoch * WHITEN_BIAS_EPOCHS)
    stop = min(total_steps, args.max_steps or total_steps)
    sgd, muon = make_optimizers(net, getattr(torch, args.ns_dtype))

    started = time.perf_counter()
    ab.init_whitening(net.whiten, train_images[:5000], largest_first=False)
    step, epoch_seconds = 0, []
    profiler = ab.StepProfiler(args.profile, args.profile_step)
    profiler.after(step)
    for epoch in range(math.ceil(args.epochs)):
        epoch_start = time.perf_counter()
        for images, labels in batches.epoch(epoch, memory_format):
            net.whiten.bias.requires_grad = step < whiten_bias_steps
            outputs = ab.forward(net, images)
            loss = F.cross_entropy(outputs, labels, label_smoothing=ab.LABEL_SMOOTHING, reduction="sum")
            loss.backward()
            sgd.param_groups[0]["lr"] = sgd.param_groups[0]["initial_lr"] * (1 - step / whiten_bias_steps)
            for group in sgd.param_groups[1:] + muon.param_groups:
                group["lr"] = group["initial_lr"] * (1 - step / total_steps)
            sgd.step()
            muon.step()
            net.zero_grad(set_to_none=True)
            step += 1
            profiler.after(step)
            if step >= stop:
                break
        epoch_seconds.append(time.perf_counter() - epoch_start)
        train_acc = (outputs.argmax(1) == labels).float().mean().item()
        emit(
            f"epoch {epoch + 1:2d}  step {step:4d}  train loss {loss.item() / len(labels):.4f}  "
            f"train acc {100 * train_acc:.2f} %  {epoch_seconds[-1]:.1f} s",
            {"event": "epoch", "epoch": epoch + 1, "step": step, "train_loss": loss.item() / len(labels),
             "train_accuracy": train_acc, "seconds": epoch_seconds[-1]},
        )
        if step >= stop:
            break
    train_seconds = time.perf_counter() - started

    eval_start = time.perf_counter()
    plain = None if args.no_eval else ab.accuracy(net, test_images, test_labels, False, memory_format)
    tta = None if args.no_eval else ab.accuracy(net, test_images, test_labels, True, memory_format)
    eval_seconds = time.perf_counter() - eval_start
    if args.save:
        state = net.state_dict()
        # tch-cifar reads the network's name here (load_state_dict ignores it).
        state._metadata[""]["model"] = "airbench94-muon"
        torch.save(state, args.save)
    summary = {
        "event": "summary", "model": "airbench94-muon", "epochs": args.epochs, "steps": step,
        "seed": args.seed, "device": str(device), "threads": torch.get_num_threads(),
        "channels_last": args.channels_last, "precision": precision_name, "ns_dtype": args.ns_dtype, "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / max(step, 1), "epoch_seconds": epoch_seconds,
        "accuracy": plain, "tta_accuracy": tta, "eval_seconds": eval_seconds,
    }
    if not args.json and not args.no_eval:
        print(f"test accuracy {100 * plain:.2f} % ({100 * tta:.2f} % with TTA); "
              f"{train_seconds:.1f} s of training, {eval_seconds:.1f} s of evaluation")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    sys.exit(main())
