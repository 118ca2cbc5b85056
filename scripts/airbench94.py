#!/usr/bin/env python3
"""A PyTorch reference for tch-cifar's fast recipe: airbench94 (Keller
Jordan's 94 %-in-10-epochs CIFAR-10 recipe), reading the same binary batches
as tch-cifar, for side-by-side runs on the same machine and data.

    airbench94.py --data-dir DIR [--epochs 9.9] [--seed 0] [--device cpu]
                  [--threads N] [--channels-last] [--max-steps N] [--precision fp32|bf16|fp16]
                  [--no-eval] [--profile TRACE]
                  [--save net.pth] [--json]

The recipe, in the order a step uses it:
* data: the images normalized with CIFAR-10's mean and std; every image
  flipped left-right at random once, then all of them flipped together on
  every odd epoch ("alternating flip"); each epoch a random translation of up
  to 2 pixels from a reflect-padded copy; mini-batches of 1024 from a
  per-epoch permutation, the last partial batch dropped;
* net: a frozen 2x2 patch-whitening convolution (24 filters from the
  eigenvectors of the patch covariance of 5000 training images, and their
  negatives; its bias trains for the first 3 epochs), GELU, three groups of
  conv3x3 - max-pool 2 - BatchNorm - GELU - conv3x3 - BatchNorm - GELU at
  widths 64/256/256, max-pool 3, a bias-free linear layer, the logits scaled
  by 1/9. Convolutions start as partial identities (dirac); BatchNorm has
  eps 1e-12, momentum 0.4, a frozen scale of 1 and a trainable bias;
* loss: cross-entropy with label smoothing 0.2, summed over the batch;
* optimizer: Nesterov SGD, momentum 0.85, learning rate and weight decay in
  the decoupled form (per 1024 images), the BatchNorm biases at 64 times the
  learning rate with the same decay; a piecewise-linear schedule (0.2 -> 1.0
  over the first 23 % of the steps, then down to 0.07);
* lookahead: every 5 steps the weights and an EMA copy are blended with a
  weight that ramps up as (step/total)^3, and the last step copies the EMA in;
* evaluation: plain, and with test-time augmentation (the mirror image and the
  two 1-pixel diagonal translations, weighted as airbench94 does).

The last line of output is a JSON summary (with --json, every event is JSON).
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = "test_batch.bin"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

# The recipe's hyperparameters (airbench94's), in decoupled form.
EPOCHS = 9.9
BATCH_SIZE = 1024
LR = 11.5  # per 1024 images
MOMENTUM = 0.85
WEIGHT_DECAY = 0.0153  # per 1024 images, decoupled from the learning rate
BIAS_SCALER = 64.0
LABEL_SMOOTHING = 0.2
WHITEN_BIAS_EPOCHS = 3
WIDTHS = (64, 256, 256)
BN_MOMENTUM = 0.4  # PyTorch's convention: the weight of the new batch
SCALE = 1 / 9
TRANSLATE = 2
LOOKAHEAD_EVERY = 5


def read_batches(data_dir, files):
    """(images [N, 3, 32, 32] uint8, labels [N] int64) from binary batches."""
    raw = b"".join(open(os.path.join(data_dir, f), "rb").read() for f in files)
    records = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, 3073)
    return records[:, 1:].reshape(-1, 3, 32, 32).clone(), records[:, 0].long()


def normalize(images):
    mean = torch.tensor(CIFAR_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


# ---------------------------------------------------------------- augmentation


def random_flip(images, generator):
    """Each image mirrored left-right with probability 1/2."""
    mask = torch.rand(len(images), generator=generator, device=images.device) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


def random_translate(padded, size, generator):
    """Each image a random size x size window of its padded copy: a shift of
    up to `pad` pixels in each direction, all of one shift taken at once."""
    pad = (padded.shape[-1] - size) // 2
    shifts = torch.randint(-pad, pad + 1, (len(padded), 2), generator=generator, device=padded.device)
    out = torch.empty(len(padded), padded.shape[1], size, size, dtype=padded.dtype, device=padded.device)
    for dy in range(-pad, pad + 1):
        for dx in range(-pad, pad + 1):
            mask = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            out[mask] = padded[mask, :, pad + dy : pad + dy + size, pad + dx : pad + dx + size]
    return out


class TrainBatches:
    """The training set's mini-batches, epoch after epoch, augmented."""

    def __init__(self, images, labels, generator, batch_size=BATCH_SIZE):
        self.labels = labels
        self.batch_size = batch_size
        self.generator = generator
        flipped = random_flip(images, generator)
        self.padded = F.pad(flipped, (TRANSLATE,) * 4, mode="reflect")
        self.size = images.shape[-1]
        self.steps_per_epoch = len(images) // batch_size

    def epoch(self, epoch, memory_format):
        images = random_translate(self.padded, self.size, self.generator)
        if epoch % 2 == 1:
            images = images.flip(-1)
        images = images.contiguous(memory_format=memory_format)
        order = torch.randperm(len(images), generator=self.generator, device=images.device)
        for i in range(self.steps_per_epoch):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield images[index], self.labels[index]


# ---------------------------------------------------------------------- model


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a frozen scale of 1 and a trainable bias."""

    def __init__(self, channels):
        super().__init__(channels, eps=1e-12, momentum=BN_MOMENTUM)
        self.weight.requires_grad = False


class Conv(nn.Conv2d):
    """A 'same' 3x3 convolution without bias, started as a partial identity."""

    def __init__(self, channels_in, channels_out):
        super().__init__(channels_in, channels_out, 3, padding="same", bias=False)

    def reset_parameters(self):
        super().reset_parameters()
        with torch.no_grad():
            nn.init.dirac_(self.weight[: self.in_channels])


class ConvGroup(nn.Module):
    def __init__(self, channels_in, channels_out):
        super().__init__()
        self.conv1 = Conv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(channels_out)
        self.conv2 = Conv(channels_out, channels_out)
        self.norm2 = BatchNorm(channels_out)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))  # [N, C, H/2, W/2]
        return self.activ(self.norm2(self.conv2(x)))  # same shape


class Airbench94(nn.Module):
    def __init__(self, num_classes=10, scale=SCALE):
        super().__init__()
        self.scale = scale
        whiten_width = 2 * 3 * 2 * 2
        self.whiten = nn.Conv2d(3, whiten_width, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad = False
        with torch.no_grad():
            self.whiten.bias.zero_()
        self.layer1 = ConvGroup(whiten_width, WIDTHS[0])
        self.layer2 = ConvGroup(WIDTHS[0], WIDTHS[1])
        self.layer3 = ConvGroup(WIDTHS[1], WIDTHS[2])
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(WIDTHS[2], num_classes, bias=False)

    def forward(self, x):
        x = F.gelu(self.whiten(x))  # [N, 24, 31, 31]
        x = self.layer1(x)  # [N, 64, 15, 15]
        x = self.layer2(x)  # [N, 256, 7, 7]
        x = self.layer3(x)  # [N, 256, 3, 3]
        x = self.pool(x).flatten(1)  # [N, 256]
        return self.head(x) * self.scale  # [N, classes]


def init_whitening(conv, images, eps=5e-4, largest_first=True):
    """The whitening filters: eigenvectors of the covariance of the images'
    2x2 patches, scaled by 1/sqrt(eigenvalue), then their negatives; the
    largest eigenvalue's first, or eigh's ascending order."""
    c, (h, w) = images.shape[1], conv.weight.shape[2:]
    patches = images.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w).double()
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvectors = eigenvectors.T
    if largest_first:
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(0)
    filters = (eigenvectors / torch.sqrt(eigenvalues + eps).view(-1, 1)).view(-1, c, h, w)
    with torch.no_grad():
        conv.weight.copy_(torch.cat((filters, -filters)).float())


# ------------------------------------------------------------------ optimizer


def learning_rate_factor(step, total_steps):
    """The piecewise-linear schedule: 0.2 -> 1 over the first 23 % of the
    steps, then 1 -> 0.07 at the last."""
    warmup = int(total_steps * 0.23)
    if step < warmup:
        return 0.2 + 0.8 * step / warmup
    return 1.0 + (0.07 - 1.0) * (step - warmup) / (total_steps - warmup)


def make_optimizer(net):
    kilostep_scale = 1024 * (1 + 1 / (1 - MOMENTUM))
    lr = LR / kilostep_scale
    wd = WEIGHT_DECAY * BATCH_SIZE / kilostep_scale
    lr_biases = lr * BIAS_SCALER
    norm_biases = [p for k, p in net.named_parameters() if "norm" in k and p.requires_grad]
    others = [p for k, p in net.named_parameters() if "norm" not in k and p.requires_grad]
    groups = [
        dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
        dict(params=others, lr=lr, weight_decay=wd / lr),
    ]
    return torch.optim.SGD(groups, momentum=MOMENTUM, nesterov=True)


class Lookahead:
    """An EMA copy of the weights that the weights are pulled back to."""

    def __init__(self, net):
        self.ema = {k: v.clone() for k, v in net.state_dict().items()}

    @torch.no_grad()
    def update(self, net, decay):
        for ema, now in zip(self.ema.values(), net.state_dict().values()):
            if now.dtype.is_floating_point:
                ema.lerp_(now, 1 - decay)
                now.copy_(ema)


class StepProfiler:
    """torch.profiler around one step (1-based), from the end of the step
    before (so the batch's selection is in it) to the end of that step,
    saved as a Chrome trace; nothing without a path."""

    def __init__(self, path, step):
        self.path, self.step, self.active = path, step, None

    def after(self, done):
        if not self.path:
            return
        if self.active is not None and done == self.step:
            self.active.__exit__(None, None, None)
            self.active.export_chrome_trace(self.path)
            self.active = None
        elif done + 1 == self.step:
            from torch.profiler import ProfilerActivity, profile
            self.active = profile(activities=[ProfilerActivity.CPU])
            self.active.__enter__()


# ----------------------------------------------------------------- evaluation


# The autocast dtype (--precision): None for float32 throughout.
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
precision = {"dtype": None}


def set_precision(name, device):
    """--precision, as tch-cifar's: fp32, bf16 (autocast in bfloat16, the
    CPU's), fp16 (autocast in float16, CUDA's); None picks fp16 on CUDA and
    fp32 elsewhere."""
    if name is None:
        name = "fp16" if device.type == "cuda" else "fp32"
    precision["dtype"] = AUTOCAST[name]
    return name


def mixed_precision(device):
    """Autocast in the chosen precision, as tch-cifar's recipes (weights,
    BatchNorm and the loss stay in float32 under autocast)."""
    dtype = precision["dtype"]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def forward(net, x):
    """The network's float32 logits, in the chosen precision."""
    with mixed_precision(x.device):
        return net(x).float()


def add_precision_argument(parser):
    parser.add_argument("--precision", choices=sorted(AUTOCAST),
                        help="fp32, bf16 (CPU autocast) or fp16 (default: fp16 on CUDA, fp32 elsewhere)")


@torch.no_grad()
def logits(net, images, tta):
    """The logits, with tta: the average over the mirror image and, at half
    the weight, the two 1-pixel diagonal translations and their mirrors."""

    def mirrored(x):
        return 0.5 * forward(net, x) + 0.5 * forward(net, x.flip(-1))

    if not tta:
        return forward(net, images)
    padded = F.pad(images, (1,) * 4, mode="reflect")
    translated = [padded[:, :, 0:32, 0:32], padded[:, :, 2:34, 2:34]]
    shifted = torch.stack([mirrored(x) for x in translated]).mean(0)
    return 0.5 * mirrored(images) + 0.5 * shifted


def accuracy(net, images, labels, tta, memory_format, batch=2000):
    net.eval()
    correct = 0
    for x, y in zip(images.split(batch), labels.split(batch)):
        x = x.contiguous(memory_format=memory_format)
        correct += (logits(net, x, tta).argmax(1) == y).sum().item()
    net.train()
    return correct / len(labels)


# ------------------------------------------------------------------- training


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder of CIFAR-10 binary batches")
    parser.add_argument("--epochs", type=float, default=EPOCHS, help="passes over the training set (9.9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (the schedule is unchanged)")
    parser.add_argument("--no-eval", action="store_true", help="skip the test-set evaluation (speed runs)")
    parser.add_argument("--profile", help="record one step with torch.profiler into this Chrome trace")
    parser.add_argument("--profile-step", type=int, default=3, help="the step --profile records (3)")
    parser.add_argument("--save", help="write the trained state_dict here (torch.save)")
    parser.add_argument("--json", action="store_true", help="every event as a JSON line")
    add_precision_argument(parser)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision_name = set_precision(args.precision, device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def emit(text, event):
        print(json.dumps(event) if args.json else text, flush=True)

    train_images, train_labels = read_batches(args.data_dir, TRAIN_FILES)
    test_images, test_labels = read_batches(args.data_dir, [TEST_FILE])
    train_images, test_images = normalize(train_images.to(device)), normalize(test_images.to(device))
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)

    net = Airbench94().to(device).to(memory_format=memory_format)
    batches = TrainBatches(train_images, train_labels, generator)
    total_steps = math.ceil(batches.steps_per_epoch * args.epochs)
    optimizer = make_optimizer(net)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, total_steps))
    ramp = 0.95**5 * (torch.arange(total_steps + 1) / total_steps) ** 3
    loss_fn = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING, reduction="sum")

    started = time.perf_counter()
    init_whitening(net.whiten, train_images[:5000])
    lookahead = Lookahead(net)
    step, epoch_seconds = 0, []
    profiler = StepProfiler(args.profile, args.profile_step)
    profiler.after(step)
    for epoch in range(math.ceil(args.epochs)):
        net.whiten.bias.requires_grad = epoch < WHITEN_BIAS_EPOCHS
        epoch_start = time.perf_counter()
        for images, labels in batches.epoch(epoch, memory_format):
            outputs = forward(net, images)
            loss = loss_fn(outputs, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            profiler.after(step)
            if step % LOOKAHEAD_EVERY == 0:
                lookahead.update(net, decay=ramp[step].item())
            if step >= total_steps:
                lookahead.update(net, decay=1.0)
            if step >= min(total_steps, args.max_steps or total_steps):
                break
        epoch_seconds.append(time.perf_counter() - epoch_start)
        train_acc = (outputs.argmax(1) == labels).float().mean().item()
        emit(
            f"epoch {epoch + 1:2d}  step {step:4d}  train loss {loss.item() / len(labels):.4f}  "
            f"train acc {100 * train_acc:.2f} %  {epoch_seconds[-1]:.1f} s",
            {"event": "epoch", "epoch": epoch + 1, "step": step, "train_loss": loss.item() / len(labels),
             "train_accuracy": train_acc, "seconds": epoch_seconds[-1]},
        )
        if args.max_steps and step >= args.max_steps:
            break
    train_seconds = time.perf_counter() - started

    eval_start = time.perf_counter()
    plain = None if args.no_eval else accuracy(net, test_images, test_labels, False, memory_format)
    tta = None if args.no_eval else accuracy(net, test_images, test_labels, True, memory_format)
    eval_seconds = time.perf_counter() - eval_start
    if args.save:
        torch.save(net.state_dict(), args.save)
    summary = {
        "event": "summary", "epochs": args.epochs, "steps": step, "seed": args.seed,
        "device": str(device), "threads": torch.get_num_threads(), "channels_last": args.channels_last, "precision": precision_name,
        "train_seconds": train_seconds, "seconds_per_step": train_seconds / max(step, 1),
        "epoch_seconds": epoch_seconds, "accuracy": plain, "tta_accuracy": tta, "eval_seconds": eval_seconds,
    }
    if not args.json and not args.no_eval:
        print(f"test accuracy {100 * plain:.2f} % ({100 * tta:.2f} % with TTA); "
              f"{train_seconds:.1f} s of training, {eval_seconds:.1f} s of evaluation")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    sys.exit(main())
