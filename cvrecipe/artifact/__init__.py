"""The model artifact: a model built from config and data, its checkpoint files, and batched
inference on uint8 images. Everything that trains, evaluates, exports or serves a model gets it
from here, so a model is built, stored and run one way.

    build.py       build_model(cfg, ds): the configured network with its preprocessing and any
                   data-dependent initialisation
    checkpoint.py  best.safetensors (weights + metadata, no pickle) and last.ckpt (resume state)
    inference.py   predict_logits / iter_logits: uint8 (N, C, H, W) → logits, batched, with TTA
    tta.py         the test-time views
"""
