"""Segmentation models: every one gives (B, K, H, W) logits at any input size and rebuilds from its
metadata; the U-Net's depth/width/normalisation switches; the encoder U-Net carries the pretrained
EfficientNet-Lite0 weights of the registered classifier."""
import pytest
import torch
from torch import nn

from cvrecipe.models import create_model, list_models, model_from_meta, model_outputs


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, channels", [("unet", {"depth": 2, "width": 4}, 1),
                                                    ("unet-encoder", {"encoder": "small-cnn", "width": 4}, 1),
                                                    ("unet-encoder", {"pretrained": False}, 3)])
def test_segmentation_models_forward_any_size_and_rebuild(name, kwargs, channels):
    assert name in list_models("masks") and name not in list_models()
    model = create_model(name, 3, channels, (32, 32), outputs="masks", **kwargs).eval()
    assert model_outputs(name) == "masks"  # the task is recorded by the artifact layer, not the model
    for h, w in ((32, 32), (45, 38)):  # sides that are no multiple of the stride are padded and cropped back
        x = torch.randint(0, 256, (2, channels, h, w), dtype=torch.uint8)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, 3, h, w)
    clone = model_from_meta(model.meta)
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(clone.eval()(x), out)


@pytest.mark.parametrize("norm, layer", [("batch", nn.BatchNorm2d), ("instance", nn.InstanceNorm2d),
                                         ("group", nn.GroupNorm)])
def test_unet_switches(norm, layer):
    net = create_model("unet", 2, 1, (64, 64), outputs="masks", depth=3, width=8, norm=norm).net
    assert any(isinstance(m, layer) for m in net.modules())
    convs = [m for m in net.down.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32]  # width doubled per step, depth 3
    assert net.bottom[0].out_channels == 64
    with pytest.raises(ValueError, match="norm"):
        create_model("unet", 2, 1, (64, 64), outputs="masks", norm="layer")


def test_a_classifier_is_refused_for_segmentation_and_back():
    with pytest.raises(ValueError, match="unet outputs masks"):
        create_model("unet", 2, 1, (32, 32))
    with pytest.raises(ValueError, match="small-cnn outputs labels"):
        create_model("small-cnn", 2, 1, (32, 32), outputs="masks")


def test_the_encoder_has_the_pretrained_efficientnet_weights():
    seg = create_model("unet-encoder", 2, 3, (64, 64), outputs="masks")
    classifier = create_model("efficientnet-lite0", 2, 3, (64, 64))
    assert torch.equal(seg.net.encoder._conv_stem.weight, classifier.net.backbone._conv_stem.weight)
    assert torch.equal(seg.net.encoder._blocks[5]._project_conv.weight,
                       classifier.net.backbone._blocks[5]._project_conv.weight)
    assert seg.meta["mean"] == [0.5] * 3 and seg.meta["std"] == [0.5] * 3  # its preprocessing, not the data's
