"""Model registry. Importing this package registers every model family."""
from cvrecipe.models import cnn, detectors, pretrained, resnet, speedrun, unet  # noqa: F401  (registration side effect)
from cvrecipe.models.registry import (ImageModel, create_model, list_models, list_pretrained, model_from_meta,
                                      model_outputs)

__all__ = ["ImageModel", "create_model", "list_models", "list_pretrained", "model_from_meta", "model_outputs"]
