"""Half-precision weights: the layout (network in bf16/fp16, BatchNorm in fp32), fp32 master copies
against a plain fp32 optimizer, why master copies exist, and a run that resumes exactly and whose
checkpoint loads as an ordinary fp32 model."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cvrecipe.artifact.checkpoint import load_model
from cvrecipe.config import ConfigError, load_config
from cvrecipe.data import load_dataset
from cvrecipe.train.loop import fit
from cvrecipe.train.precision import MasterWeights, to_half_weights

from conftest import tiny_speedrun


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_layout_keeps_batchnorm_in_fp32(dtype):
    model = Net()
    params = list(model.parameters())
    to_half_weights(model, dtype)
    assert [p is q for p, q in zip(params, model.parameters())] == [True] * len(params)  # same objects
    conv, bn, _, fc = model.net
    assert conv.weight.dtype == fc.weight.dtype == dtype
    assert bn.weight.dtype == bn.running_mean.dtype == torch.float32
    out = model(torch.randn(2, 3, 8, 8))  # fp32 input: cast on the way in
    assert out.dtype == dtype


def test_master_weights_step_like_an_fp32_optimizer_on_the_same_gradients():
    torch.manual_seed(0)
    reference, half = Net(), Net()
    to_half_weights(half, torch.bfloat16)
    reference.load_state_dict({k: v.float() for k, v in half.state_dict().items()})  # the same starting point
    master = MasterWeights(half)
    groups = master.param_groups([{"params": list(half.parameters())}])
    opt_half = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 3, 8, 8)
    for _ in range(3):
        half(x).float().square().mean().backward()
        master.to_master()
        for p_ref, (p_half, m) in zip(reference.parameters(), master.pairs):
            p_ref.grad = m.grad.clone()  # the same gradients for both optimizers
        opt_half.step(), opt_ref.step()
        master.to_model()
        opt_half.zero_grad(), half.zero_grad(), opt_ref.zero_grad()
    for p_ref, (p_half, m) in zip(reference.parameters(), master.pairs):
        torch.testing.assert_close(m, p_ref)  # the copies are exactly the fp32 optimizer's weights
        assert torch.equal(p_half, p_ref.to(p_half.dtype))  # and the model holds them rounded


def test_small_updates_round_away_without_master_weights():
    """Why master copies: bf16 near 1.0 moves in steps of 2^-7, so an update of 1e-4 is lost."""
    half = torch.ones(4, dtype=torch.bfloat16)
    master = half.float()
    for _ in range(100):
        half -= torch.full_like(half, 1e-4)
        master -= 1e-4
    assert torch.equal(half, torch.ones(4, dtype=torch.bfloat16))
    assert master[0].item() == pytest.approx(0.99, abs=1e-5)


def test_a_half_weights_run_resumes_exactly_and_saves_an_fp32_loadable_model(tmp_path):
    cfg = tiny_speedrun(tmp_path, ["train.epochs=3", "train.half_weights=true"])
    ds = load_dataset(cfg.data, seed=0)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight.mkdir(), stopped.mkdir()
    fit(cfg, ds, straight)

    class Stop:
        def on_epoch_end(self, row, model):
            if row["epoch"] == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, ds, stopped, callbacks=[Stop()])
    fit(cfg, ds, stopped, resume=True)
    a, b = load_file(straight / "best.safetensors"), load_file(stopped / "best.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["net.2.conv1.weight"].dtype == torch.bfloat16 and a["net.2.norm1.bias"].dtype == torch.float32
    model = load_model(straight)  # rebuilt from metadata in fp32, the half weights cast on load
    assert next(model.parameters()).dtype == torch.float32
    as_trained = load_model(straight)
    to_half_weights(as_trained, torch.bfloat16)  # the layout it was trained in: same weights, bf16 arithmetic
    x = torch.from_numpy(ds.test.x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), as_trained(x).float(), atol=0.05, rtol=0.05)


def test_half_weights_rules():
    with pytest.raises(ConfigError, match="train.half_weights=true needs train.precision fp16 or bf16"):
        load_config(None, ["train.half_weights=true", "train.precision=fp32"])
    with pytest.raises(ConfigError, match="master_weights=false .* needs train.precision=bf16"):
        load_config(None, ["train.half_weights=true", "train.precision=fp16", "optim.master_weights=false"])
