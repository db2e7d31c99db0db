from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet50 as tv_resnet50
from typer.testing import CliRunner

from cifarnet_cli import pretrained
from cifarnet_cli.cli import app
from cifarnet_cli.errors import CifarNetError
from cifarnet_cli.models import get_model

from .conftest import pin_asset

runner = CliRunner()
FAST = [
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--accum",
    "1",
    "--val-split",
    "10",
    "--image-size",
    "32",
    "--warmup-epochs",
    "0",
    "--quiet",
    "--json",
]


@pytest.fixture
def data(image_folder: Callable[..., Path]) -> Path:
    return image_folder(per_class=3)


@pytest.fixture
def imagenet_state(tmp_path: Path) -> Path:
    """Random ResNet-50 weights with features of a trained network's scale: the residual branches start at
    zero (zero_init_residual). A random body at full scale gives features whose squared norm is ~57,000 and a
    head trained on them diverges (the finetune run stops), which is not what these tests are about."""
    torch.manual_seed(3)
    path = tmp_path / "resnet50-random.pth"
    torch.save(tv_resnet50(weights=None, zero_init_residual=True).state_dict(), path)
    return path


def test_random_init_finetune_produces_a_run_evaluate_reads(data: Path) -> None:
    result = runner.invoke(
        app, ["finetune-resnet50", "--data-dir", str(data), "--weights", "none", "--run", "ft", *FAST]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    ckpt = torch.load(out["checkpoint"], weights_only=True)
    assert ckpt["meta"]["arch"] == "resnet50" and ckpt["meta"]["model_kwargs"]["image_size"] == 32
    assert ckpt["config"]["task"] == "finetune-resnet50"
    evaluated = runner.invoke(app, ["evaluate", "ft", "--split", "val", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(out["best_accuracy"])


def test_state_dict_path_is_loaded_strictly_with_a_new_head(data: Path, imagenet_state: Path) -> None:
    result = runner.invoke(
        app,
        [
            "finetune-resnet50",
            "--data-dir",
            str(data),
            "--weights",
            str(imagenet_state),
            "--freeze-backbone",
            "--run",
            "sd",
            *FAST,
        ],
    )
    assert result.exit_code == 0, result.output
    trained = torch.load(json.loads(result.stdout.strip().splitlines()[-1])["checkpoint"], weights_only=True)["model"]
    source = torch.load(imagenet_state, weights_only=True)
    # frozen backbone: every body tensor (BN statistics too) is still the loaded one; the head is new
    for key, value in source.items():
        if not key.startswith("fc."):
            assert torch.equal(trained[f"body.{key}"], value), key
    assert trained["body.fc.weight"].shape == (10, 2048)


def test_module_prefixes_are_stripped(imagenet_state: Path, tmp_path: Path) -> None:
    state = torch.load(imagenet_state, weights_only=True)
    prefixed = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, prefixed)
    model = get_model("resnet50", image_size=32)
    assert "pretrained ResNet-50 weights" in pretrained.load_weights(model, str(prefixed))
    assert torch.equal(model.body.conv1.weight, state["conv1.weight"])


def test_key_mismatch_names_the_keys(imagenet_state: Path, tmp_path: Path) -> None:
    state = torch.load(imagenet_state, weights_only=True)
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(CifarNetError, match=r"missing keys: layer1\.0\.conv1\.weight; unexpected keys: extra\.weight"):
        pretrained.load_weights(get_model("resnet50", image_size=32), str(broken))


def test_cifarnet_checkpoint_as_weights(data: Path) -> None:
    first = runner.invoke(app, ["finetune-resnet50", "--data-dir", str(data), "--weights", "none", "--run", "a", *FAST])
    ckpt = json.loads(first.stdout.strip().splitlines()[-1])["checkpoint"]
    second = runner.invoke(
        app,
        [
            "finetune-resnet50",
            "--data-dir",
            str(data),
            "--weights",
            ckpt,
            "--run",
            "b",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--val-split",
            "10",
            "--image-size",
            "32",
        ],
    )
    assert second.exit_code == 0, second.output
    assert "Loaded the whole model from the cifarnet checkpoint" in second.output


def test_hub_cache_file_with_the_pinned_hash_is_used(
    data: Path, imagenet_state: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blob = imagenet_state.read_bytes()
    pin_asset(monkeypatch, "resnet50-v1", "https://127.0.0.1:9/models/resnet50-test.pth", blob, "weights")
    hub = Path(__import__("os").environ["TORCH_HOME"]) / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "resnet50-test.pth").write_bytes(blob)
    result = runner.invoke(
        app, ["finetune-resnet50", "--data-dir", str(data), "--weights", "IMAGENET1K_V1", "--run", "hub", *FAST[:-2]]
    )
    assert result.exit_code == 0, result.output
    assert f"Loaded pretrained ResNet-50 weights from {hub / 'resnet50-test.pth'}" in result.output.replace("\n", "")


def test_imagenet_weights_without_network_fail_fast(data: Path) -> None:
    start = time.monotonic()
    result = runner.invoke(app, ["finetune-resnet50", "--data-dir", str(data), "--weights", "IMAGENET1K_V1"])
    assert result.exit_code == 1
    text = result.output.replace("\n", " ")
    assert "cifarnet download resnet50-v1 --from-file" in text and "--weights PATH" in text
    assert "Traceback" not in text and time.monotonic() - start < 10
    assert not list(Path(__import__("os").environ["CIFARNET_HOME"], "runs").glob("*/last.pt"))


def test_unfreeze_needs_freeze(data: Path) -> None:
    result = runner.invoke(app, ["finetune-resnet50", "--data-dir", str(data), "--unfreeze-at", "2"])
    assert result.exit_code == 2 and "--freeze-backbone" in result.output


def test_ctrl_c_in_a_finetune_run_names_its_own_command(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resume hint matches `runs show`: finetune-resnet50 --resume, not train --resume."""
    from cifarnet_cli import engine

    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train_one_epoch", interrupted)
    args = ["finetune-resnet50", "--data-dir", str(data), "--weights", "none", "--run", "ftc", *FAST[:-2]]
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    assert "Continue with: cifarnet finetune-resnet50 --resume ftc" in result.output


def test_random_weights_get_a_recipe_of_their_own() -> None:
    """--weights none trains a random body: another default learning rate (the pretrained one diverges),
    the body at the head's rate, a longer warm-up, and residual blocks that start as the identity."""
    from cifarnet_cli.config import FINETUNE_DEFAULTS, make_config
    from cifarnet_cli.training import build_model

    pretrained_recipe = make_config("finetune-resnet50", {})
    scratch = make_config("finetune-resnet50", {"weights": "none"})
    assert (pretrained_recipe.peak_lr, pretrained_recipe.backbone_lr_scale) == (
        0.05,
        FINETUNE_DEFAULTS["backbone_lr_scale"],
    )
    assert (scratch.peak_lr, scratch.backbone_lr_scale, scratch.warmup) == (0.01, 1.0, 1.0)
    assert scratch.batch_size == pretrained_recipe.batch_size and scratch.epochs == pretrained_recipe.epochs
    assert make_config("finetune-resnet50", {"weights": "none", "epochs": 1}).warmup == 0.2  # a fifth, as train's
    chosen = make_config("finetune-resnet50", {"weights": "none", "lr": 0.03, "backbone_lr_scale": 0.5})
    assert (chosen.peak_lr, chosen.backbone_lr_scale) == (0.03, 0.5)  # what the user gives still wins
    model = build_model(scratch.replace(image_size=32), 10, load_weights=True, on_event=lambda _e: None)
    last_norms = [block.bn3.weight for layer in ("layer1", "layer4") for block in getattr(model.body, layer)]
    assert all(int(torch.count_nonzero(w.detach())) == 0 for w in last_norms)
    help_text = runner.invoke(app, ["finetune-resnet50", "--help"], env={"COLUMNS": "200"}).output
    assert "0.01 with --weights none" in help_text
