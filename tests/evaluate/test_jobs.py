"""The jobs after training, end to end on small data: `cvrecipe run` → eval → predict, unreadable
files in predict, evaluation of the best checkpoint, and the recipe's test-time augmentation."""
import csv
import json

import pytest
import torch

from cvrecipe.artifact.checkpoint import load_model
from cvrecipe.artifact.inference import predict_logits
from cvrecipe.artifact.tta import tta_logits
from cvrecipe.cli import main
from cvrecipe.config import load_config
from cvrecipe.data import load_dataset
from cvrecipe.evaluate.job import evaluate, evaluate_run, predict
from cvrecipe.train.job import train

from conftest import make_image_folder, tiny_speedrun

pytestmark = pytest.mark.slow  # end to end: trains, exports, serves or starts processes


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_cli_run_eval_predict_on_a_folder(tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs", per_class={"train": 40, "test": 12})
    (data / "test" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    runs = tmp_path / "runs"
    code = main(["run", "digits-quick", f"data.name=folder:{data}", f"runs_dir={runs}", "name=e2e",
                 "train.epochs=6", "model.kwargs={width: 8}"])
    assert code == 0
    run_dir = runs / "e2e"
    for name in ("config.yaml", "run.json", "metrics.csv", "best.safetensors", "last.ckpt", "eval.json",
                 "skipped_files.txt"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert "broken.jpg" in (run_dir / "skipped_files.txt").read_text()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["seed"] == 0 and "git_commit" in info
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["split"] == "test" and result["num_images"] == 36
    assert result["accuracy"] > 0.8  # stripes are easy; chance is 1/3
    assert len(read_metrics(run_dir)) == 6

    capsys.readouterr()
    assert main(["predict", str(run_dir), str(data / "test" / "fox"), "--json", "-k", "2"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 12 and all(len(p["top"]) == 2 for p in preds)
    assert sum(p["top"][0]["class"] == "fox" for p in preds) >= 9

    # a second run with the same name goes to a new folder instead of overwriting
    cfg = load_config("digits-quick", [f"runs_dir={runs}", "name=e2e", "train.epochs=1", "train.sanity=false"])
    assert train(cfg).name == "e2e-2"


def test_predict_reports_unreadable_files(tmp_path):
    cfg = load_config("digits-quick", [f"runs_dir={tmp_path}", "train.epochs=1", "train.sanity=false"])
    run_dir = train(cfg)
    (tmp_path / "bad.png").write_bytes(b"nope")
    out = predict(run_dir, [str(tmp_path / "bad.png")])
    assert out[0]["file"].endswith("bad.png") and "error" in out[0]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        predict(run_dir, [str(tmp_path / "missing.png")])


def test_eval_numbers_come_from_the_best_checkpoint(tmp_path):
    cfg = load_config("digits-quick", [f"runs_dir={tmp_path}", "train.epochs=3", "train.sanity=false"])
    run_dir = train(cfg)
    result = evaluate(run_dir)
    model = load_model(run_dir)
    ds = load_dataset(cfg.data, seed=cfg.train.seed)
    with torch.no_grad():
        acc = (model(torch.from_numpy(ds.test.x)).argmax(1).numpy() == ds.test.y).mean()
    assert result["accuracy"] == pytest.approx(acc)


@pytest.mark.parametrize("hflip", [True, False])
def test_evaluation_uses_the_recipes_tta(tmp_path, hflip):
    """TTA 2 as the recipe asks; a model trained without flips is not shown mirrored views."""
    cfg = tiny_speedrun(tmp_path, ["train.epochs=1", f"runs_dir={tmp_path / 'runs'}", "train.sanity=false",
                                    f"augment.hflip={str(hflip).lower()}"])
    run_dir = train(cfg)
    result, logits = evaluate_run(run_dir)
    assert result["tta"] == 2
    model = load_model(run_dir)
    ds = load_dataset(cfg.data, seed=0)
    x = torch.from_numpy(ds.test.x)
    with torch.no_grad():
        model.eval()
        expected = tta_logits(model, x, 2, mirror=hflip)
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(expected, tta_logits(model, x, 2, mirror=not hflip))
    assert result["accuracy"] == pytest.approx((expected.argmax(1) == torch.from_numpy(ds.test.y)).float().mean().item())
    torch.testing.assert_close(predict_logits(model, x, 7, tta=2, tta_mirror=hflip), expected)


