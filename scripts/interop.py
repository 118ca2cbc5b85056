#!/usr/bin/env python3
"""The Python side of tch-cifar's round trips with PyTorch.

    interop.py init --seed S [--pth FILE] [--safetensors FILE]
        torch.manual_seed(S); Net(), and its state_dict saved as torch.save
        (.pth) and/or safetensors.
    interop.py logits --weights FILE --input X.safetensors --out Y.safetensors
        Loads a state_dict (.pth via torch.load(weights_only=True), or
        safetensors) into the tutorial's Net with load_state_dict (strict) and
        writes net(input).
    interop.py run-script --model model.pt --input X.safetensors --out Y.safetensors
        torch.jit.load(model) and writes model(input).
    interop.py preprocess IMAGE... --out X.safetensors
        PIL + torchvision: RGB, Resize((32, 32)), ToTensor, Normalize(0.5, 0.5).
    interop.py accuracy --data-dir DIR (--weights FILE | --script model.pt) [--json]
        The tutorial's test loop on DIR/test_batch.bin, printing the same lines
        as `tch-cifar evaluate`.
    interop.py train --data-dir DIR --out cifar_net.pth [--epochs 2] [--seed S] [--lr 0.001]
        The tutorial's training, verbatim, on the CIFAR-10 binary batches in
        DIR, saved with torch.save(net.state_dict(), PATH).

Tensors are exchanged as safetensors files with one tensor, keyed "input"
or "output". CPU only. Needs the project's venv (torch, torchvision,
safetensors, pillow).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from safetensors.torch import load_file, save_file

# torchvision and PIL are imported where they are used: importing them costs
# most of a second, and the tests start this script many times.

CLASSES = ('plane', 'car', 'bird', 'cat',
           'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


# The tutorial's network, exactly as the tutorial defines it.
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1) # flatten all dimensions except batch
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x


def tutorial_transform():
    """The tutorial's preprocessing."""
    import torchvision.transforms as transforms
    transform = transforms.Compose(
        [transforms.ToTensor(),
         transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    return transform


class CifarBinary(torch.utils.data.Dataset):
    """CIFAR-10 from the binary batches, served like torchvision's CIFAR10:
    HWC uint8 arrays turned into PIL images, then `transform`."""

    def __init__(self, data_dir, train, transform=None):
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] if train else ["test_batch.bin"]
        raw = b"".join(open(os.path.join(data_dir, n), "rb").read() for n in names)
        records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3073)
        self.targets = records[:, 0].astype(np.int64).tolist()
        self.data = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
        self.transform = transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        from PIL import Image
        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def load_weights(path):
    """A state_dict from a .pth (torch.save) or a safetensors file."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip:
        return torch.load(path, weights_only=True)
    return load_file(path)


def load_net(path):
    net = Net()
    net.load_state_dict(load_weights(path))  # strict: every key, no extra
    net.eval()
    return net


def cmd_init(args):
    torch.manual_seed(args.seed)
    net = Net()
    if args.pth:
        torch.save(net.state_dict(), args.pth)
    if args.safetensors:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, args.safetensors)


def write_output(path, tensor):
    save_file({"output": tensor.detach().contiguous()}, path)


def cmd_logits(args):
    net = load_net(args.weights)
    with torch.no_grad():
        write_output(args.out, net(load_file(args.input)["input"]))


def cmd_run_script(args):
    model = torch.jit.load(args.model)
    with torch.no_grad():
        write_output(args.out, model(load_file(args.input)["input"]))


def cmd_preprocess(args):
    import torchvision.transforms as transforms
    from PIL import Image
    resize = transforms.Compose([transforms.Resize((32, 32)), tutorial_transform()])
    batch = torch.stack([resize(Image.open(p).convert("RGB")) for p in args.images])
    save_file({"input": batch}, args.out)


def cmd_accuracy(args):
    if args.script:
        net = torch.jit.load(args.script)
    else:
        net = load_net(args.weights)
    testset = CifarBinary(args.data_dir, train=False, transform=tutorial_transform())
    testloader = torch.utils.data.DataLoader(testset, batch_size=args.batch_size, shuffle=False)
    correct = 0
    total = 0
    correct_pred = {classname: 0 for classname in CLASSES}
    total_pred = {classname: 0 for classname in CLASSES}
    with torch.no_grad():
        for data in testloader:
            images, labels = data
            outputs = net(images)
            _, predicted = torch.max(outputs, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
            for label, prediction in zip(labels, predicted):
                if label == prediction:
                    correct_pred[CLASSES[label]] += 1
                total_pred[CLASSES[label]] += 1
    if args.json:
        print(json.dumps({"correct": correct, "total": total, "accuracy": 100 * correct / total,
                          "correct_per_class": correct_pred, "total_per_class": total_pred}))
        return
    print(f'Accuracy of the network on the {total} test images: {100 * correct // total} %')
    for classname, correct_count in correct_pred.items():
        if total_pred[classname] == 0:
            print(f'Accuracy for class: {classname:5s} is n/a %')
            continue
        accuracy = 100 * float(correct_count) / total_pred[classname]
        print(f'Accuracy for class: {classname:5s} is {accuracy:.1f} %')


def cmd_train(args):
    if args.seed is not None:
        torch.manual_seed(args.seed)
    batch_size = 4
    trainset = CifarBinary(args.data_dir, train=True, transform=tutorial_transform())
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=batch_size,
                                              shuffle=True, num_workers=args.workers)
    net = Net()
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)

    for epoch in range(args.epochs):  # loop over the dataset multiple times

        running_loss = 0.0
        for i, data in enumerate(trainloader, 0):
            # get the inputs; data is a list of [inputs, labels]
            inputs, labels = data

            # zero the parameter gradients
            optimizer.zero_grad()

            # forward + backward + optimize
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()

            # print statistics
            running_loss += loss.item()
            if i % args.log_every == args.log_every - 1:    # print every 2000 mini-batches
                print(f'[{epoch + 1}, {i + 1:5d}] loss: {running_loss / args.log_every:.3f}',
                      flush=True)
                running_loss = 0.0

    print('Finished Training')
    PATH = args.out
    torch.save(net.state_dict(), PATH)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="a freshly initialized Net's state_dict")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--pth")
    p.add_argument("--safetensors")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("logits", help="Net with a state_dict, run on an input")
    p.add_argument("--weights", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_logits)

    p = sub.add_parser("run-script", help="a TorchScript module run on an input")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_run_script)

    p = sub.add_parser("preprocess", help="image files as a normalized batch")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("accuracy", help="the tutorial's test loop on test_batch.bin")
    p.add_argument("--data-dir", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--weights", help="a state_dict: .pth or safetensors")
    g.add_argument("--script", help="a TorchScript module (tch-cifar export)")
    p.add_argument("--batch-size", type=int, default=1000,
                   help="images per forward pass (the tutorial uses 4; "
                        "1000 is what `tch-cifar evaluate` uses)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_accuracy)

    p = sub.add_parser("train", help="the tutorial's training, saved as a .pth")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", default="./cifar_net.pth")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (the tutorial's 2)")
    p.add_argument("--lr", type=float, default=0.001, help="SGD learning rate (the tutorial's 0.001)")
    p.add_argument("--log-every", type=int, default=2000)
    p.set_defaults(func=cmd_train)

    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
