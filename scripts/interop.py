#!/usr/bin/env python3
"""The Python side of tch-cifar's round trips with PyTorch.

    interop.py init --seed S [--num-classes N] [--pth FILE] [--pth-no-crc FILE] [--safetensors FILE]
        torch.manual_seed(S); Net(N) (N = 10 by default: the tutorial's Net()),
        and its state_dict saved as torch.save (.pth; --pth-no-crc after
        set_crc32_options(False), which writes every CRC as 0) and/or safetensors.
    interop.py logits --weights FILE --input X.safetensors --out Y.safetensors
        Loads a state_dict (.pth via torch.load(weights_only=True), or
        safetensors) into the tutorial's Net, with as many outputs as the
        weights' fc3 has, with load_state_dict (strict) and writes net(input).
    interop.py run-script --model model.pt --input X.safetensors --out Y.safetensors [--method M]
        torch.jit.load(model) and writes model(input), or model.M(input).
    interop.py script-info --model model.pt --input X.safetensors --out Y.safetensors
        Inspects an exported module: prints its parameters, its output in
        float64 after .to("cpu", torch.float64), and whether an SGD step
        changes them, as JSON; writes the output of the tutorial's Net
        loaded from the module's state_dict.
    interop.py preprocess IMAGE... --out X.safetensors
        PIL + torchvision: RGB, Resize((32, 32)), ToTensor, Normalize(0.5, 0.5).
    interop.py accuracy --data-dir DIR (--weights FILE | --script model.pt) [--json]
        The tutorial's test loop on DIR/test_batch.bin, or on an image tree's
        DIR/test/ (or DIR/val/) through torchvision's ImageFolder with
        Resize((32, 32)), printing the same lines as `tch-cifar evaluate`.
    interop.py airbench-keys --num-classes N
        The state_dict of scripts/airbench94.py's Airbench94(N): key, shape
        and dtype of each entry, in order, as JSON.
    interop.py airbench-logits --weights FILE --input X.safetensors --out Y.safetensors [--tta] [--muon]
        Loads a state_dict (.pth or safetensors) into Airbench94 (strict) in
        eval mode and writes logits(net, x, tta) (the reference's function)
        for a batch normalized to [-1, 1] as tch-cifar holds images,
        renormalized with CIFAR-10's mean and std as tch-cifar does.
    interop.py airbench-accuracy --data-dir DIR --weights FILE [--tta]
        The same on DIR/test_batch.bin: {"correct", "total", "accuracy"} as JSON.
    interop.py airbench-script --model model.pt
        An exported airbench94 module: its state_dict's keys, shapes and
        dtypes, which entries are parameters (with requires_grad) and which
        buffers, as JSON; and the state_dict loads into Airbench94 (strict).
    interop.py image-folder ROOT [--pixels X.safetensors]
        torchvision's ImageFolder(ROOT): prints its classes, class_to_idx and
        samples (paths relative to ROOT) as JSON; --pixels writes the images
        as Pillow decodes them (convert("RGB"), then Resize((32, 32)) when
        another size), uint8 [N, 3, 32, 32], with their labels.

The tutorial's own training (saved with torch.save(net.state_dict(), PATH))
is scripts/pytorch_tutorial.py --save PATH.

Tensors are exchanged as safetensors files with one tensor, keyed "input"
or "output". CPU only. Needs the project's venv (torch, torchvision,
safetensors, pillow).
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

# torchvision and PIL are imported where they are used: importing them costs
# most of a second, and the tests start this script many times.

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The tutorial's Net (verbatim), its preprocessing and the binary-batch
# Dataset live in pytorch_tutorial.py, which also trains the tutorial.
from pytorch_tutorial import CLASSES, BinaryCIFAR10, Net, tutorial_transform  # noqa: E402


def load_weights(path):
    """A state_dict from a .pth (torch.save) or a safetensors file."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip:
        return torch.load(path, weights_only=True)
    return load_file(path)


def load_net(path):
    state = load_weights(path)
    net = Net(state["fc3.weight"].shape[0])  # one output per class
    net.load_state_dict(state)  # strict: every key, no extra
    net.eval()
    return net


def cmd_init(args):
    torch.manual_seed(args.seed)
    net = Net(args.num_classes)
    if args.pth:
        torch.save(net.state_dict(), args.pth)
    if args.pth_no_crc:
        torch.serialization.set_crc32_options(False)
        torch.save(net.state_dict(), args.pth_no_crc)
        torch.serialization.set_crc32_options(True)
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
    forward = getattr(model, args.method) if args.method else model
    with torch.no_grad():
        write_output(args.out, forward(load_file(args.input)["input"]))


def load_airbench(path, muon=False):
    """scripts/airbench94.py's Airbench94 holding a state_dict, in eval mode;
    with muon, as scripts/airbench94_muon.py builds it (logits scaled by 1/256)."""
    from airbench94 import Airbench94, WIDTHS
    state = load_weights(path)
    scale = {"scale": 1 / WIDTHS[2]} if muon else {}
    net = Airbench94(state["head.weight"].shape[0], **scale)
    net.load_state_dict(state)  # strict: every key, no extra
    net.eval()
    # The layout tch-cifar evaluates in.
    return net.to(memory_format=torch.channels_last)


def airbench_input(images):
    """Images normalized to [-1, 1] (as tch-cifar holds them) renormalized
    with CIFAR-10's mean and std, in the order of tch-cifar's ops."""
    from airbench94 import CIFAR_MEAN, CIFAR_STD
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    x = ((images * 0.5 + 0.5) - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


def cmd_airbench_keys(args):
    from airbench94 import Airbench94
    state = Airbench94(args.num_classes).state_dict()
    print(json.dumps([[k, list(v.shape), str(v.dtype)] for k, v in state.items()]))


def cmd_airbench_logits(args):
    from airbench94 import logits
    net = load_airbench(args.weights, args.muon)
    x = airbench_input(load_file(args.input)["input"])
    write_output(args.out, logits(net, x, args.tta))


def cmd_airbench_accuracy(args):
    from airbench94 import logits
    net = load_airbench(args.weights, args.muon)
    testset = BinaryCIFAR10(args.data_dir, train=False, transform=tutorial_transform())
    loader = torch.utils.data.DataLoader(testset, batch_size=1000, shuffle=False)
    correct = total = 0
    for images, labels in loader:
        predicted = logits(net, airbench_input(images), args.tta).argmax(1)
        correct += (predicted == labels).sum().item()
        total += len(labels)
    print(json.dumps({"correct": correct, "total": total, "accuracy": 100 * correct / total}))


def cmd_airbench_script(args):
    from airbench94 import Airbench94
    model = torch.jit.load(args.model)
    state = model.state_dict()
    net = Airbench94(state["head.weight"].shape[0])
    net.load_state_dict(state)  # strict
    print(json.dumps({
        "state_dict": [[k, list(v.shape), str(v.dtype)] for k, v in state.items()],
        "parameters": [[k, p.requires_grad] for k, p in model.named_parameters()],
        "buffers": [k for k, _ in model.named_buffers()],
        "reference_parameters": [[k, p.requires_grad] for k, p in net.named_parameters()],
        "reference_buffers": [k for k, _ in net.named_buffers()],
    }))


def cmd_script_info(args):
    x = load_file(args.input)["input"]
    model = torch.jit.load(args.model)
    parameters = [[name, list(p.shape), p.requires_grad] for name, p in model.named_parameters()]
    # The tutorial's Net takes the module's state_dict as it is (strict).
    net = Net()
    net.load_state_dict(model.state_dict())
    net.eval()
    with torch.no_grad():
        write_output(args.out, net(x))
        want = model(x)
        # Constants baked into a graph would stay float32 and fail here.
        wide = torch.jit.load(args.model).to("cpu", torch.float64)
        y64 = wide(x.double())
    # The parameters train: one SGD step on them changes them.
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(x)
    loss = torch.nn.functional.mse_loss(out, torch.zeros_like(out) + 0.5)
    loss.backward()
    opt.step()
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters())]
    print(json.dumps({
        "parameters": parameters,
        "state_dict": list(model.state_dict()),
        "float64_dtype": str(y64.dtype),
        "float64_max_diff": (y64 - want.double()).abs().max().item(),
        "sgd_step_changed": changed,
    }))


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
    tree = [os.path.join(args.data_dir, d) for d in ("test", "val")
            if os.path.isdir(os.path.join(args.data_dir, d))]
    if tree:
        import torchvision.transforms as transforms
        from torchvision.datasets import ImageFolder
        transform = transforms.Compose([transforms.Resize((32, 32)), tutorial_transform()])
        testset = ImageFolder(tree[0], transform=transform)
        classes = testset.classes
    else:
        testset = BinaryCIFAR10(args.data_dir, train=False, transform=tutorial_transform())
        classes = CLASSES
    testloader = torch.utils.data.DataLoader(testset, batch_size=args.batch_size, shuffle=False)
    correct = 0
    total = 0
    correct_pred = {classname: 0 for classname in classes}
    total_pred = {classname: 0 for classname in classes}
    with torch.no_grad():
        for data in testloader:
            images, labels = data
            outputs = net(images)
            _, predicted = torch.max(outputs, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
            for label, prediction in zip(labels, predicted):
                if label == prediction:
                    correct_pred[classes[label]] += 1
                total_pred[classes[label]] += 1
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


def cmd_image_folder(args):
    import numpy as np
    import torchvision.transforms as transforms
    from torchvision.datasets import ImageFolder
    dataset = ImageFolder(args.root)
    print(json.dumps({
        "classes": dataset.classes,
        "class_to_idx": dataset.class_to_idx,
        "samples": [[os.path.relpath(p, args.root), i] for p, i in dataset.samples],
    }))
    if args.pixels:
        resize = transforms.Resize((32, 32))
        pixels = torch.empty((len(dataset), 3, 32, 32), dtype=torch.uint8)
        for i, (path, _) in enumerate(dataset.samples):
            image = dataset.loader(path)  # Image.open(f).convert("RGB")
            if image.size != (32, 32):
                image = resize(image)
            pixels[i] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        save_file({"pixels": pixels, "labels": torch.tensor(dataset.targets)}, args.pixels)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="a freshly initialized Net's state_dict")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--pth")
    p.add_argument("--pth-no-crc")
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
    p.add_argument("--method", help="a method to call instead of forward (e.g. tta)")
    p.set_defaults(func=cmd_run_script)

    p = sub.add_parser("airbench-keys", help="Airbench94's state_dict keys, shapes, dtypes")
    p.add_argument("--num-classes", type=int, default=10)
    p.set_defaults(func=cmd_airbench_keys)

    p = sub.add_parser("airbench-logits", help="Airbench94 with a state_dict, run on an input")
    p.add_argument("--weights", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tta", action="store_true")
    p.add_argument("--muon", action="store_true", help="airbench94-muon's network")
    p.set_defaults(func=cmd_airbench_logits)

    p = sub.add_parser("airbench-accuracy", help="Airbench94's accuracy on test_batch.bin")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--tta", action="store_true")
    p.add_argument("--muon", action="store_true", help="airbench94-muon's network")
    p.set_defaults(func=cmd_airbench_accuracy)

    p = sub.add_parser("airbench-script", help="an exported airbench94 module's entries")
    p.add_argument("--model", required=True)
    p.set_defaults(func=cmd_airbench_script)

    p = sub.add_parser("script-info", help="an exported module's parameters, and their uses")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_script_info)

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

    p = sub.add_parser("image-folder", help="torchvision's ImageFolder on a folder of classes")
    p.add_argument("root")
    p.add_argument("--pixels", help="write the decoded 32x32 images here (safetensors)")
    p.set_defaults(func=cmd_image_folder)

    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
