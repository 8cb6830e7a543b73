import pytest
import torch
from torch import nn

from cvrecipe.models import create_model, list_models, model_from_meta


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_every_model_forward_and_rebuild(name, channels, size):
    model = create_model(name, num_classes=7, in_channels=channels, input_size=(size, size),
                         mean=[0.5] * channels, std=[0.25] * channels, class_names=list("abcdefg"))
    x = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)
    model.eval()
    out = model(x)
    assert out.shape == (2, 7) and out.dtype == torch.float32
    # uint8 input and the same image as float in [0, 1] give the same logits
    assert torch.allclose(out, model(x.float() / 255), atol=1e-5)
    clone = model_from_meta(model.meta)
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone.eval()(x), out)


def test_seed_cnn_is_the_keras_example():
    net = create_model("seed-cnn", num_classes=10, in_channels=3, input_size=(32, 32)).net
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [(32, (3, 3), (0, 0)), (64, (3, 3), (0, 0)),
                                                                          (128, (3, 3), (0, 0))]
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 3
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(512, 64), (64, 10)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_resnet18_small_image_stem():
    net = create_model("resnet18", num_classes=10, in_channels=3).net
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)


def test_unknown_model_names_the_choices():
    with pytest.raises(KeyError, match="seed-cnn"):
        create_model("no-such-net", num_classes=2)
