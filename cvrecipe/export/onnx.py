"""ONNX: write a model with torch.onnx's exporter, run it with ONNX Runtime.

The exported graph keeps the model's own interface: uint8 images (B, C, H, W) in, float32
logits (B, K) out, with the rescale-and-normalise step inside the graph. A consumer therefore
needs only ONNX Runtime and an image decoder, never this package.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_NAME = "image"  # (B, C, H, W) uint8
OUTPUT_NAME = "logits"  # (B, K) float32
MAX_DYNAMIC_BATCH = 4096  # upper bound declared for the dynamic batch dimension


def write_onnx(module: nn.Module, sample: torch.Tensor, path: Path, dynamic_batch: bool) -> dict:
    """Export `module` (eval mode) traced on `sample` (B, C, H, W) uint8; returns facts for model.json.

    Uses the torch.export-based exporter (torch's default since 2.9; needs onnxscript) with the
    weights embedded in the one file. Without `dynamic_batch` the batch dimension is fixed at
    the sample's batch size.
    """
    kwargs = {}
    if dynamic_batch:
        # a sample batch of 2: torch.export specialises dimensions of size 1
        sample = sample[:1].expand(2, *sample.shape[1:]).contiguous()
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)},)
    torch.onnx.export(module.eval(), (sample,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamo=True, external_data=False, verbose=False, **kwargs)
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "batch_size": None if dynamic_batch else int(sample.shape[0]),
            "runtime": "onnxruntime", "input": INPUT_NAME, "output": OUTPUT_NAME}


class OnnxRunner:
    """An ONNX Runtime session with the `predict(uint8 (B, C, H, W)) → float32 (B, K)` interface.

    A graph with a fixed batch size is run in slices of that size (the last one zero-padded).
    """

    def __init__(self, path: Path, threads: int | None = None, spin: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            # idle ONNX Runtime threads otherwise busy-wait for the next call, taking CPU from a
            # server's event loop and decoders between forward passes
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # CPU provider only: results then match the parity check, which also ran on the CPU
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        spec = self.session.get_inputs()[0]
        self.input_name = spec.name
        self.fixed_batch = spec.shape[0] if isinstance(spec.shape[0], int) else None

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.uint8)
        if self.fixed_batch is None or len(x) == self.fixed_batch:
            return self.session.run(None, {self.input_name: x})[0]
        out = []
        for start in range(0, len(x), self.fixed_batch):
            part = x[start:start + self.fixed_batch]
            padded = np.zeros((self.fixed_batch, *x.shape[1:]), np.uint8)
            padded[:len(part)] = part
            out.append(self.session.run(None, {self.input_name: padded})[0][:len(part)])
        return np.concatenate(out)
