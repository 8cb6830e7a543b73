"""Export: ONNX and TorchScript files checked against the eager model, with model.json beside them.

The names below are loaded on first use, so that `cvrecipe.export.manifest` and
`cvrecipe.export.onnx`'s runner (what a server of an ONNX export needs) come without torch.
"""
__all__ = ["FORMATS", "ExportError", "ExportResult", "export_model", "export_run"]


def __getattr__(name: str):
    if name in __all__:
        from cvrecipe.export import exporter

        return getattr(exporter, name)
    raise AttributeError(f"module 'cvrecipe.export' has no attribute '{name}'")
