"""The peer server for bench/serve.py: LitServe serving an ONNX export with ONNX Runtime.

    python bench/litserve_peer.py EXPORT_DIR --port 8001 [--max-batch-size 32] [--max-wait-ms 5]

POST /predict with a multipart `file` field → {"top": [{"class", "probability"}, ...]} (top 5), as
`cvrecipe serve`'s /v1/predict. Images are decoded by the same function as cvrecipe's server
(cvrecipe.imagefile.decode_array), so the two servers differ in their serving machinery only.
One API process and one inference worker, on the CPU.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import litserve as ls
import numpy as np

from cvrecipe.imagefile import decode_array


class OnnxClassifier(ls.LitAPI):
    def __init__(self, export_dir: Path, **kwargs):
        super().__init__(**kwargs)
        self.export_dir = export_dir

    def setup(self, device):
        import onnxruntime as ort

        manifest = json.loads((self.export_dir / "model.json").read_text())
        pre = manifest["preprocessing"]
        self.channels, self.size = pre["channels"], tuple(pre["input_size"])
        self.classes = manifest["class_names"]
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as cvrecipe serve
        self.session = ort.InferenceSession(str(self.export_dir / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def decode_request(self, request):
        return decode_array(request["file"].file.read(), self.channels, self.size)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        return self.session.run(None, {self.input_name: x})[0]

    def unbatch(self, output):
        return list(output)

    def encode_response(self, logits):
        z = np.exp(logits - logits.max())
        p = z / z.sum()
        return {"top": [{"class": self.classes[i], "probability": float(p[i])} for i in np.argsort(-p)[:5]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args()
    api = OnnxClassifier(args.export_dir, max_batch_size=args.max_batch_size, batch_timeout=args.max_wait_ms / 1000,
                         api_path="/predict")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=30)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
