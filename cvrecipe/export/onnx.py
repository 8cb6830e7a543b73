"""ONNX: write a model with torch.onnx's exporter, run it with ONNX Runtime.

The exported graph keeps the model's own interface: uint8 images (B, C, H, W) in, float32
logits (B, K) out, with the rescale-and-normalise step inside the graph. A consumer therefore
needs only ONNX Runtime and an image decoder, never this package. A classifier's graph has a
second output, `features` (B, D): the input of its head (the last Gemm/MatMul), which the
server's drift monitoring embeds; consumers that ask for the first output never see it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

INPUT_NAME = "image"  # (B, C, H, W) uint8
OUTPUT_NAME = "logits"  # (B, K) float32
FEATURES_NAME = "features"  # (B, D) float32: the head's input
MAX_DYNAMIC_BATCH = 4096  # upper bound declared for the dynamic batch dimension


def write_onnx(module, sample, path: Path, dynamic_batch: bool, outputs: tuple[str, ...] = (OUTPUT_NAME,)) -> dict:
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
    torch.onnx.export(module.eval(), (sample,), str(path), input_names=[INPUT_NAME], output_names=list(outputs),
                      dynamo=True, external_data=False, verbose=False, **kwargs)
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    # one (B, K) output (a classifier's logits): its head's input is added as a second output
    one_row_each = len(outputs) == 1 and len(proto.graph.output[0].type.tensor_type.shape.dim) == 2
    features = _add_features_output(proto) if one_row_each else None
    if features:
        onnx.save(proto, str(path))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "batch_size": None if dynamic_batch else int(sample.shape[0]),
            "runtime": "onnxruntime", "input": INPUT_NAME, "output": outputs[0], "outputs": list(outputs),
            "features": features}


def _add_features_output(proto) -> str | None:
    """Expose the input of the graph's last Gemm/MatMul (the classifier's head; nodes are in
    topological order) as the output FEATURES_NAME; None when the graph has no such node."""
    from onnx import helper, shape_inference

    heads = [node for node in proto.graph.node if node.op_type in ("Gemm", "MatMul")]
    if not heads:
        return None
    name = heads[-1].input[0]
    # its element type (float16 in a --half export), as shape inference finds it
    known = {v.name: v.type.tensor_type.elem_type for v in shape_inference.infer_shapes(proto).graph.value_info}
    elem_type = known.get(name, proto.graph.output[0].type.tensor_type.elem_type)
    proto.graph.node.append(helper.make_node("Identity", [name], [FEATURES_NAME]))
    proto.graph.output.append(helper.make_tensor_value_info(FEATURES_NAME, elem_type, None))
    return FEATURES_NAME


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
        self.features_name = next((o.name for o in self.session.get_outputs() if o.name == FEATURES_NAME), None)
        self.fixed_batch = spec.shape[0] if isinstance(spec.shape[0], int) else None
        self.io_binding = io_binding

    def _run(self, x: np.ndarray) -> np.ndarray:
        if not self.io_binding:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, x)
        binding.bind_output(self.output_name)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._batched(self._run, x)

    def predict_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (B, K), features (B, D)) in one forward pass; features None for a graph without them."""
        if self.features_name is None:
            return self.predict(x), None
        names = [self.output_name, self.features_name]

        def run(batch: np.ndarray) -> np.ndarray:  # both outputs side by side, so that _batched slices them alike
            logits, features = self.session.run(names, {self.input_name: batch})
            return np.concatenate([logits, features.reshape(len(features), -1).astype(logits.dtype)], 1)

        both = self._batched(run, x)
        k = self.session.get_outputs()[0].shape[1]
        return both[:, :k], both[:, k:]

    def _batched(self, run, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.uint8)
        if self.fixed_batch is None or len(x) == self.fixed_batch:
            return run(x)
        out = []
        for start in range(0, len(x), self.fixed_batch):
            part = x[start:start + self.fixed_batch]
            padded = np.zeros((self.fixed_batch, *x.shape[1:]), np.uint8)
            padded[:len(part)] = part
            out.append(run(padded)[:len(part)])
        return np.concatenate(out)
