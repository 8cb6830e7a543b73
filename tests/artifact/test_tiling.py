"""Sliding-window inference reproduces a whole-image forward pass: exactly for a pointwise model
(the Gaussian blending weights are normalised), and closely in the interior for a U-Net, with no
seams where tiles meet (unlike plain averaging of the tiles, shown for contrast)."""
import pytest
import torch
from monai.inferers import sliding_window_inference

from cvrecipe.artifact.inference import predict_logits
from cvrecipe.artifact.tiling import run_outputs, tiled
from cvrecipe.models import create_model

TILE, OVERLAP = 64, 0.5
BOUNDARIES = [32, 64, 96, 128]  # where tiles of 64 with stride 32 start and end inside a 160-wide image


def test_a_pointwise_model_is_reproduced_exactly():
    conv = torch.nn.Conv2d(1, 3, 1)
    x = (torch.rand(2, 1, 150, 170, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    with torch.no_grad():
        whole = conv(x.float())
        out = tiled(lambda w: conv(w.float()), x, [TILE, TILE], OVERLAP, batch=5)
    assert out.shape == whole.shape
    torch.testing.assert_close(out, whole, atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = create_model("unet", 2, 1, (TILE, TILE), outputs="masks", depth=3, width=8).eval()
    model.meta["tile"] = {"size": [TILE, TILE], "overlap": OVERLAP, "batch": 8}
    x = (torch.rand(1, 1, 192, 160, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    with torch.no_grad():
        model.net.head.weight.mul_(2 / model(x).std())  # logits of std 2: classes are decided, not near-ties
        whole = model(x)
    return model, x, whole


def test_tiles_reproduce_the_whole_image_in_the_interior(unet):
    model, x, whole = unet
    out = predict_logits(model, x)  # the path evaluation, predict and export parity take: tiles via meta
    assert out.shape == whole.shape
    inner = (slice(None), slice(None), slice(16, -16), slice(16, -16))  # away from the image's own borders
    diff = (out - whole)[inner].abs()
    assert diff.max() < 0.1 * whole.std(), f"interior differs by up to {diff.max():.3f} (logit std {whole.std():.2f})"
    agree = (out.argmax(1) == whole.argmax(1))[:, 16:-16, 16:-16].float().mean()
    assert agree >= 0.999


def test_no_seams_where_tiles_meet(unet):
    """The error at the columns where tiles start or end is as small as inside the tiles; averaging
    the tiles without weights (MONAI's 'constant' mode) leaves a visible step there."""
    model, x, whole = unet
    with torch.no_grad():
        gaussian = run_outputs(model, x, model.meta)
        constant = sliding_window_inference(x.float(), (TILE, TILE), 8, lambda w: model(w.to(torch.uint8)),
                                            overlap=OVERLAP, mode="constant")
    rows = slice(16, -16)
    seam = lambda out: (out - whole).abs()[0, :, rows].amax(0).mean(0)[BOUNDARIES].mean()  # noqa: E731
    assert seam(gaussian) < 0.05 * whole.std()
    assert seam(constant) > 5 * seam(gaussian)  # the test can see a seam when there is one
