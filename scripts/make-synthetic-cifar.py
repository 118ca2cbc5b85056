#!/usr/bin/env python3
"""Writes a small CIFAR-10-format dataset with a learnable pattern, for tests.

    make-synthetic-cifar.py OUT_DIR [--train N] [--test N] [--seed S] [--archive FILE]

OUT_DIR gets data_batch_1.bin ... data_batch_5.bin, test_batch.bin and
batches.meta.txt in CIFAR-10's binary layout (records of 1 label byte + 3072
planar R, G, B bytes). --archive also packs them as a cifar-10-binary.tar.gz
(entries under cifar-10-batches-bin/, like the official archive).

Each image is dim noise with one bright 8x6 block whose place and colour
depend on the class, so a small CNN learns it within a few hundred steps.
Standard library only, deterministic for a given seed.
"""
import argparse
import os
import random
import tarfile

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def image(rng, label):
    planes = [bytearray(b >> 2 for b in rng.randbytes(1024)) for _ in range(3)]
    top, left = 4 + 16 * (label // 5), 1 + 6 * (label % 5)
    colour = [(label * 37) % 3, (label * 11 + 1) % 3]  # two lit channels of three
    for c in set(colour):
        for y in range(top, top + 8):
            for x in range(left, left + 6):
                planes[c][y * 32 + x] = 200 + (rng.random() < 0.5) * 55
    return bytes([label]) + b"".join(bytes(p) for p in planes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=500)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--archive", help="also write a cifar-10-binary.tar.gz here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    train = [image(rng, i % 10) for i in range(args.train)]
    rng.shuffle(train)
    test = [image(rng, i % 10) for i in range(args.test)]
    names = [f"data_batch_{i + 1}.bin" for i in range(5)]
    per_file = -(-len(train) // 5)
    for i, name in enumerate(names):
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(b"".join(train[i * per_file:(i + 1) * per_file]))
    with open(os.path.join(args.out, "test_batch.bin"), "wb") as f:
        f.write(b"".join(test))
    with open(os.path.join(args.out, "batches.meta.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n\n")
    if args.archive:
        with tarfile.open(args.archive, "w:gz") as tar:
            for name in names + ["test_batch.bin", "batches.meta.txt"]:
                tar.add(os.path.join(args.out, name), arcname=f"cifar-10-batches-bin/{name}")


if __name__ == "__main__":
    main()
