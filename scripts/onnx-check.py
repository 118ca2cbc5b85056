#!/usr/bin/env python3
"""Checks and runs `tch-cifar export --onnx` models with onnx and onnxruntime.

    onnx-check.py info MODEL
        Runs onnx.checker.check_model(full_check=True) (which also infers
        every shape) and prints one JSON object: the producer, the opset,
        the doc_string, metadata_props, and the inputs and outputs with
        their shapes (a named dimension as its name).
    onnx-check.py run MODEL --input X.safetensors --out Y.safetensors [--batch-size N]
        Runs the model with onnxruntime on the CPU on the tensor in
        X.safetensors (its only one), N images at a time (default: all),
        and writes the output, under its name, to Y.safetensors.
    onnx-check.py accuracy MODEL --data-dir DIR [--batch-size N] [--predictions FILE]
                           [--outputs FILE.npy] [--threads T]
        The accuracy on DIR's test_batch.bin (CIFAR-10's binary batch, in
        DIR or DIR/cifar-10-batches-bin): each image scaled to [0, 1] and
        normalized with the model's metadata_props input_mean and
        input_std, N at a time (default 1000). Prints one JSON object:
        correct, total, accuracy (percent), confusion (true by predicted),
        seconds and images_per_second of the runs alone (after one warm-up
        batch). --predictions writes the predicted classes, one per line,
        --outputs the model's outputs as a NumPy array.

Needs numpy, onnx, onnxruntime and (for run) safetensors.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort


def session(path, threads=0):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def shape(value_info):
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in dims]


def info(args):
    model = onnx.load(args.model)
    onnx.checker.check_model(model, full_check=True)
    graph = model.graph
    print(
        json.dumps(
            {
                "ir_version": model.ir_version,
                "producer_name": model.producer_name,
                "producer_version": model.producer_version,
                "opset": {o.domain: o.version for o in model.opset_import},
                "doc_string": model.doc_string,
                "metadata": {p.key: p.value for p in model.metadata_props},
                "inputs": [{"name": i.name, "shape": shape(i)} for i in graph.input],
                "outputs": [{"name": o.name, "shape": shape(o)} for o in graph.output],
                "initializers": [t.name for t in graph.initializer],
                "ops": sorted({n.op_type for n in graph.node}),
            }
        )
    )


def run(args):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(args.input)
    if len(tensors) != 1:
        sys.exit(f"{args.input} holds {len(tensors)} tensors, not one")
    (x,) = tensors.values()
    sess = session(args.model)
    input_name = sess.get_inputs()[0].name
    output_name = sess.get_outputs()[0].name
    n = args.batch_size or len(x)
    outs = [
        sess.run([output_name], {input_name: x[i : i + n]})[0]
        for i in range(0, len(x), n)
    ]
    save_file({output_name: np.ascontiguousarray(np.concatenate(outs))}, args.out)


def read_test_batch(data_dir):
    for d in (data_dir, os.path.join(data_dir, "cifar-10-batches-bin")):
        path = os.path.join(d, "test_batch.bin")
        if os.path.exists(path):
            records = np.fromfile(path, dtype=np.uint8).reshape(-1, 1 + 3 * 32 * 32)
            return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)
    sys.exit(f"no test_batch.bin in {data_dir}")


def accuracy(args):
    sess = session(args.model, args.threads)
    meta = sess.get_modelmeta().custom_metadata_map
    classes = json.loads(meta["classes"])
    mean = np.array(json.loads(meta["input_mean"]), dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(json.loads(meta["input_std"]), dtype=np.float32).reshape(1, 3, 1, 1)
    pixels, labels = read_test_batch(args.data_dir)
    images = ((pixels.astype(np.float32) / np.float32(255)) - mean) / std
    input_name = sess.get_inputs()[0].name
    n = args.batch_size
    sess.run(None, {input_name: images[:n]})  # warm-up
    start = time.perf_counter()
    outputs = [
        sess.run(None, {input_name: images[i : i + n]})[0]
        for i in range(0, len(images), n)
    ]
    seconds = time.perf_counter() - start
    outputs = np.concatenate(outputs)
    predicted = outputs.argmax(1)
    k = len(classes)
    confusion = np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    correct = int(np.trace(confusion))
    if args.predictions:
        with open(args.predictions, "w") as f:
            f.writelines(f"{p}\n" for p in predicted)
    if args.outputs:
        np.save(args.outputs, outputs)
    print(
        json.dumps(
            {
                "correct": correct,
                "total": len(labels),
                "accuracy": 100.0 * correct / len(labels),
                "confusion": confusion.tolist(),
                "seconds": seconds,
                "images_per_second": len(labels) / seconds,
                "batch_size": n,
                "onnxruntime": ort.__version__,
            }
        )
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info")
    p.add_argument("model")
    p.set_defaults(func=info)
    p = sub.add_parser("run")
    p.add_argument("model")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=0)
    p.set_defaults(func=run)
    p = sub.add_parser("accuracy")
    p.add_argument("model")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--predictions")
    p.add_argument("--outputs")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: one per core)")
    p.set_defaults(func=accuracy)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
