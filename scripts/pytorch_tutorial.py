#!/usr/bin/env python3
"""The official PyTorch CIFAR-10 tutorial ("Training a Classifier"), reading
the CIFAR-10 *binary* batches that tch-cifar reads, for side-by-side runs.

    pytorch_tutorial.py --data-dir DIR [--loader dataloader|preloaded]
                        [--epochs 2] [--steps N] [--device cpu] [--save cifar_net.pth]
                        [--seed S] [--threads N] [--lr 0.001] [--workers 2] [--json]

--loader dataloader (the default) is the tutorial as published: a Dataset that
yields PIL images, transforms.Compose([ToTensor(), Normalize(...)]), and
DataLoader(batch_size=4, shuffle=True, num_workers=2); the test loop uses the
same transform with shuffle=False. torchvision.datasets.CIFAR10 reads the
pickled Python batches; this Dataset reads the binary ones and hands out the
same PIL images, which is the only change.

--loader preloaded is the fastest plain Python loop: the whole training set
normalized once into one tensor, mini-batches taken by indexing a per-epoch
torch.randperm, and no DataLoader. Same Net, loss, optimizer and step.

The last line of output is a JSON summary (with --json, every event is JSON).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

# torchvision and PIL are imported where they are used: they cost most of a
# second, and scripts/interop.py (which imports this file) starts often.

CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = "test_batch.bin"


class Net(nn.Module):  # the tutorial's Net; num_classes is fc3's width (10 in the tutorial)
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)  # flatten all dimensions except batch
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x


def read_batches(data_dir, files):
    """(images [N, 32, 32, 3] uint8 HWC, labels [N] int64) from binary batches."""
    raw = np.concatenate([np.fromfile(os.path.join(data_dir, f), dtype=np.uint8) for f in files])
    records = raw.reshape(-1, 3073)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return images, records[:, 0].astype(np.int64)


class BinaryCIFAR10(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does, on the binary batches."""

    def __init__(self, data_dir, train, transform=None):
        self.data, self.targets = read_batches(data_dir, TRAIN_FILES if train else [TEST_FILE])
        self.transform = transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        from PIL import Image
        img, target = Image.fromarray(self.data[index]), int(self.targets[index])
        return self.transform(img) if self.transform else img, target


def tutorial_transform():
    """The tutorial's preprocessing: ToTensor() then Normalize to [-1, 1]."""
    import torchvision.transforms as transforms
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


def preloaded(data_dir, files, device):
    import torchvision.transforms as transforms
    images, labels = read_batches(data_dir, files)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(x)
    return x.contiguous().to(device), torch.from_numpy(labels).to(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder with data_batch_*.bin and test_batch.bin")
    ap.add_argument("--loader", choices=["dataloader", "preloaded"], default="dataloader")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="stop after this many mini-batches in all")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.001, help="SGD learning rate (the tutorial's 0.001)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (the tutorial's 2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--save", default=None, help="torch.save(net.state_dict(), PATH)")
    ap.add_argument("--json", action="store_true", help="every event as a JSON line")
    args = ap.parse_args()
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def emit(text, event):
        print(json.dumps(event) if args.json else text, flush=True)

    transform = tutorial_transform()
    batch_size = args.batch_size
    if args.loader == "dataloader":
        trainset = BinaryCIFAR10(args.data_dir, train=True, transform=transform)
        trainloader = torch.utils.data.DataLoader(trainset, batch_size=batch_size, shuffle=True,
                                                  num_workers=args.workers)
        testset = BinaryCIFAR10(args.data_dir, train=False, transform=transform)
        testloader = torch.utils.data.DataLoader(testset, batch_size=batch_size, shuffle=False,
                                                 num_workers=args.workers)
        n_train = len(trainset)
    else:
        train_x, train_y = preloaded(args.data_dir, TRAIN_FILES, device)
        n_train = len(train_y)

        def trainloader_epoch():
            perm = torch.randperm(n_train, device=device)
            for start in range(0, n_train, batch_size):
                idx = perm[start:start + batch_size]
                yield train_x[idx], train_y[idx]

    net = Net().to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)

    steps = images = 0
    start = time.perf_counter()
    done = False
    for epoch in range(args.epochs):  # loop over the dataset multiple times
        running_loss = 0.0
        batches = trainloader if args.loader == "dataloader" else trainloader_epoch()
        for i, data in enumerate(batches, 0):
            # get the inputs; data is a list of [inputs, labels]
            inputs, labels = data
            if args.loader == "dataloader":
                inputs, labels = inputs.to(device), labels.to(device)
            # zero the parameter gradients
            optimizer.zero_grad()
            # forward + backward + optimize
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            # print statistics
            running_loss += loss.item()
            if i % 2000 == 1999:  # print every 2000 mini-batches
                emit(f"[{epoch + 1}, {i + 1:5d}] loss: {running_loss / 2000:.3f}",
                     {"event": "loss", "epoch": epoch + 1, "step": i + 1, "loss": running_loss / 2000})
                running_loss = 0.0
            steps += 1
            images += len(labels)
            if args.steps is not None and steps >= args.steps:
                done = True
                break
        if done:
            break
    train_seconds = time.perf_counter() - start
    emit("Finished Training", {"event": "finished_training"})
    if args.save:
        torch.save(net.state_dict(), args.save)

    correct = total = 0
    correct_pred = {c: 0 for c in CLASSES}
    total_pred = {c: 0 for c in CLASSES}
    eval_start = time.perf_counter()
    with torch.no_grad():
        if args.loader == "dataloader":
            test_batches = ((x.to(device), y.to(device)) for x, y in testloader)
        else:
            test_x, test_y = preloaded(args.data_dir, [TEST_FILE], device)
            test_batches = ((test_x[s:s + 1000], test_y[s:s + 1000]) for s in range(0, len(test_y), 1000))
        for images_, labels in test_batches:
            outputs = net(images_)
            _, predictions = torch.max(outputs, 1)
            total += labels.size(0)
            correct += (predictions == labels).sum().item()
            for label, prediction in zip(labels.tolist(), predictions.tolist()):
                total_pred[CLASSES[label]] += 1
                correct_pred[CLASSES[label]] += int(label == prediction)
    eval_seconds = time.perf_counter() - eval_start
    emit(f"Accuracy of the network on the {total} test images: {100 * correct // total} %", {"event": "accuracy"})
    per_class = {c: 100 * correct_pred[c] / total_pred[c] if total_pred[c] else None for c in CLASSES}
    if not args.json:
        for c, acc in per_class.items():
            print(f"Accuracy for class: {c:5s} is {acc:.1f} %")
    print(json.dumps({
        "event": "summary", "loader": args.loader, "accuracy": 100 * correct / total,
        "per_class_accuracy": per_class, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "images_per_second": images / train_seconds, "steps": steps, "epochs": args.epochs,
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
