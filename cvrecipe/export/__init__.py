"""Export: ONNX and TorchScript files checked against the eager model, with model.json beside them."""
from cvrecipe.export.exporter import FORMATS, ExportError, ExportResult, export_model, export_run

__all__ = ["FORMATS", "ExportError", "ExportResult", "export_model", "export_run"]
