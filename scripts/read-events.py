#!/usr/bin/env python3
"""Prints what TensorBoard reads from one run folder, as one JSON object.

    read-events.py RUN_DIR

The tests use it to check `--logdir`'s event files with TensorBoard's own
reader (`EventAccumulator`, with its purge of the steps a resumed run
restarts from), not with the writer's code:

    {"scalars": {tag: [[step, value], ...]},
     "texts": {tag: [[step, text], ...]},
     "images": {tag: [[step, width, height, png_bytes_length], ...]}}
"""

import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main():
    run_dir = sys.argv[1]
    # 0: keep every event, not a sample of them.
    acc = EventAccumulator(
        run_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0}
    )
    acc.Reload()
    tags = acc.Tags()
    out = {"scalars": {}, "texts": {}, "images": {}}
    for tag in tags.get("scalars", []):
        out["scalars"][tag] = [[e.step, e.value] for e in acc.Scalars(tag)]
    for tag in tags.get("tensors", []):
        out["texts"][tag] = [
            [e.step, b"".join(e.tensor_proto.string_val).decode("utf-8")]
            for e in acc.Tensors(tag)
        ]
    for tag in tags.get("images", []):
        out["images"][tag] = [
            [e.step, e.width, e.height, len(e.encoded_image_string)]
            for e in acc.Images(tag)
        ]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
