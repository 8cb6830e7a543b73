"""The CUDA path against the CPU path: same augmentation, same optimizer maths, a trained run that
loads and predicts the same on the CPU. Skipped where there is no CUDA device (CI has none)."""
from __future__ import annotations

import pytest
import torch

from cvrecipe.config import load_config
from cvrecipe.data import load_dataset
from cvrecipe.data.augment import alternating_flip, crop_at, cutout
from cvrecipe.device import autocast_dtype
from cvrecipe.artifact.inference import predict_logits
from cvrecipe.artifact.checkpoint import load_model
from cvrecipe.train.ema import WeightEMA
from cvrecipe.train.loop import fit
from cvrecipe.train.muon import orthogonalize

from conftest import make_image_folder

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def test_auto_precision_is_bf16_on_cuda():
    assert autocast_dtype(CUDA, "auto") == torch.bfloat16
    assert autocast_dtype(CUDA, "fp32") is None


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_device_augmentation_is_bit_identical_to_the_cpu(pad_mode):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen)
    dy, dx = torch.randint(0, 5, (64,), generator=gen), torch.randint(0, 5, (64,), generator=gen)
    base_flip = torch.rand(64, generator=gen) < 0.5
    cpu = alternating_flip(crop_at(x, 2, dy, dx, pad_mode), base_flip, epoch=1)
    gpu = alternating_flip(crop_at(x.to(CUDA), 2, dy.to(CUDA), dx.to(CUDA), pad_mode), base_flip.to(CUDA), epoch=1)
    assert torch.equal(gpu.cpu(), cpu)
    # cutout draws its squares from the generator's device: check the shape of what it did instead
    out = cutout(torch.full((32, 3, 32, 32), 9, dtype=torch.uint8, device=CUDA), 12,
                 torch.Generator(device=CUDA).manual_seed(1))
    zeros = (out == 0).flatten(1).sum(1) // 3
    assert out.device.type == CUDA.type and (zeros >= 36).all() and (zeros <= 144).all()


def test_newton_schulz_on_cuda_matches_the_cpu():
    g = torch.randn(256, 2304, generator=torch.Generator().manual_seed(0))
    cpu, gpu = orthogonalize(g), orthogonalize(g.to(CUDA)).cpu()
    # fp32 on both (TF32 may be on for CUDA matmuls): the same orthogonal factor to ~1e-3
    assert (gpu - cpu).norm() / cpu.norm() < 5e-3
    singular = torch.linalg.svdvals(gpu)
    assert singular.min() > 0.6 and singular.max() < 1.25


def test_weight_ema_lookahead_on_cuda_matches_the_cpu():
    torch.manual_seed(0)
    cpu_model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    gpu_model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).to(CUDA)
    gpu_model.load_state_dict(cpu_model.state_dict())
    emas = WeightEMA(cpu_model), WeightEMA(gpu_model)
    for model in (cpu_model, gpu_model):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    emas[0].update(cpu_model, 0.75, lookahead=True)
    emas[1].update(gpu_model, 0.75, lookahead=True)
    for key, value in cpu_model.state_dict().items():
        torch.testing.assert_close(gpu_model.state_dict()[key].cpu(), value, msg=key)


def test_speedrun_recipe_trains_on_cuda_and_its_checkpoint_predicts_the_same_on_cpu(tmp_path):
    data = make_image_folder(tmp_path / "imgs", per_class={"train": 200, "test": 40}, size=32)
    cfg = load_config("cifar10-speedrun", [f"data.name=folder:{data}", "train.device=cuda", "train.epochs=6",
                                           "train.batch_size=64"])
    ds = load_dataset(cfg.data, seed=0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    history = fit(cfg, ds, run_dir)
    assert len(history) == 6
    on_gpu, on_cpu = load_model(run_dir, CUDA), load_model(run_dir, "cpu")
    x = torch.from_numpy(ds.test.x)
    gpu_logits = predict_logits(on_gpu, x, 50, tta=2)
    cpu_logits = predict_logits(on_cpu, x, 50, tta=2)
    # cuDNN may run fp32 convs in TF32 (10-bit mantissa): agreement to ~1e-2, not bit for bit
    torch.testing.assert_close(gpu_logits, cpu_logits, atol=1e-2, rtol=1e-2)
    accuracy = (gpu_logits.argmax(1) == torch.from_numpy(ds.test.y)).float().mean().item()
    assert accuracy > 0.8  # three learnable classes: chance is 1/3
