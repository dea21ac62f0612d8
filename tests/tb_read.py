"""Reads a TensorBoard log directory with TensorBoard's own reader and prints what it holds as
JSON: {"scalars": {tag: [[step, value], ...]}, "texts": {tag: [[step, text], ...]}}, in the
order TensorBoard keeps them. NaN is printed as the string "NaN" (JSON has no NaN).
Used by tests/tensorboard.rs: python tb_read.py LOGDIR
"""
import json
import math
import sys

from tensorboard.backend.event_processing import event_accumulator

# 0 keeps every event (the defaults sample scalars and keep 10 texts).
acc = event_accumulator.EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
acc.Reload()
tags = acc.Tags()
scalars = {
    tag: [[e.step, "NaN" if math.isnan(e.value) else e.value] for e in acc.Scalars(tag)]
    for tag in tags["scalars"]
}
texts = {
    tag: [[e.step, e.tensor_proto.string_val[0].decode()] for e in acc.Tensors(tag)]
    for tag in tags["tensors"]
}
json.dump({"scalars": scalars, "texts": texts}, sys.stdout)
