"""ONNX: write a model with torch.onnx's exporter, run it with ONNX Runtime.

The exported graph keeps the model's own interface: uint8 images (B, C, H, W) in, float32
logits (B, K) out, with the rescale-and-normalise step inside the graph. A consumer therefore
needs only ONNX Runtime and an image decoder, never this package.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

INPUT_NAME = "image"  # (B, C, H, W) uint8
OUTPUT_NAME = "logits"  # (B, K) float32
MAX_DYNAMIC_BATCH = 4096  # upper bound declared for the dynamic batch dimension


def write_onnx(module, sample, path: Path, dynamic_batch: bool) -> dict:
    """Export `module` (eval mode) traced on `sample` (B, C, H, W) uint8; returns facts for model.json.

    Uses the torch.export-based exporter (torch's default since 2.9; needs onnxscript) with the
    weights embedded in the one file. Without `dynamic_batch` the batch dimension is fixed at
    the sample's batch size. (`module`: an nn.Module; `sample`: a uint8 tensor. torch is imported
    here, not at the top: OnnxRunner serves without it.)
    """
    import torch

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


OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                "all": "ORT_ENABLE_ALL"}  # graph optimisation levels, by the names `cvrecipe serve` takes


class OnnxRunner:
    """An ONNX Runtime session with the `predict(uint8 (B, C, H, W)) → float32 (B, K)` interface.

    A graph with a fixed batch size is run in slices of that size (the last one zero-padded).
    `threads` / `inter_threads`: ONNX Runtime's intra-op and inter-op thread counts (None: its
    default, one intra-op thread per core); `optimization`: the graph optimisation level (a key of
    OPTIMIZATION); `io_binding`: run through an IO binding (output allocated by ONNX Runtime and
    handed over without the copy `run` makes).
    """

    def __init__(self, path: Path, threads: int | None = None, spin: bool = True, inter_threads: int | None = None,
                 optimization: str = "all", io_binding: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if inter_threads:
            options.inter_op_num_threads = inter_threads
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION[optimization])
        if not spin:
            # idle ONNX Runtime threads otherwise busy-wait for the next call, taking CPU from a
            # server's event loop and decoders between forward passes
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        # CPU provider only: results then match the parity check, which also ran on the CPU
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        spec = self.session.get_inputs()[0]
        self.input_name = spec.name
        self.output_name = self.session.get_outputs()[0].name
        self.fixed_batch = spec.shape[0] if isinstance(spec.shape[0], int) else None
        self.io_binding = io_binding

    def _run(self, x: np.ndarray) -> np.ndarray:
        if not self.io_binding:
            return self.session.run(None, {self.input_name: x})[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, x)
        binding.bind_output(self.output_name)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.uint8)
        if self.fixed_batch is None or len(x) == self.fixed_batch:
            return self._run(x)
        out = []
        for start in range(0, len(x), self.fixed_batch):
            part = x[start:start + self.fixed_batch]
            padded = np.zeros((self.fixed_batch, *x.shape[1:]), np.uint8)
            padded[:len(part)] = part
            out.append(self._run(padded)[:len(part)])
        return np.concatenate(out)
