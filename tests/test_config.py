from pathlib import Path

import pytest
from conftest import compose_cfg
from hydra.utils import instantiate

import visionft.conf

CONF = Path(visionft.conf.__file__).parent
OPTIONS = [(g.name, f.stem) for g in sorted(CONF.iterdir()) if g.is_dir() and not g.name.startswith("_")
           for f in sorted(g.glob("*.yaml"))]


def test_conf_ships_with_the_package():
    assert (CONF / "config.yaml").is_file()
    assert {g for g, _ in OPTIONS} >= {"backbone", "data", "strategy", "trainer", "experiment"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_conf_file_composes(group, option, tmp_path):
    override = f"{'+' if group == 'row' else ''}{group}={option}"  # row: not in the defaults list (a results-table row)
    extra = ["backbone.name=resnet18"] if (group, option) == ("backbone", "timm") else []  # the generic entry
    cfg = compose_cfg([override, *extra], tmp_path)
    if group == "experiment":  # a @package _global_ delta: it changes other groups
        assert cfg.data._target_ == "datamodules.ImageFolderDataModule" and cfg.data.per_class == 100
    elif group == "hparams_search":  # a delta on Hydra's own config: the sweeper and its search space
        from hydra import compose, initialize_config_module

        with initialize_config_module("visionft.conf", version_base="1.3"):
            full = compose("config", overrides=[override], return_hydra_config=True)
        assert "optuna" in full.hydra.sweeper._target_.lower() and "strategy.lr" in full.hydra.sweeper.params
    elif group == "row":  # a @package _global_ delta: a strategy (and maybe its options or wise.alphas)
        named = (CONF / "row" / f"{option}.yaml").read_text().split("override /strategy: ")[1].split()[0]
        assert cfg.strategy._target_ == compose_cfg([f"strategy={named}"], tmp_path).strategy._target_
        assert instantiate(cfg.strategy).lr > 0 and cfg.data.per_class is None  # a row is only a strategy delta
    else:
        assert cfg[group] is not None
    if group == "strategy":
        strategy = instantiate(cfg.strategy)  # every strategy YAML builds its object
        assert strategy.lr > 0
    if group == "backbone":
        assert cfg.backbone.name and "pretrained" in cfg.backbone


def test_defaults_are_the_offline_quickstart(tmp_path):
    cfg = compose_cfg([], tmp_path)
    assert cfg.backbone.name == "tf_efficientnet_lite0.in1k"
    assert cfg.data._target_ == "datamodules.DigitsDataModule"
    assert cfg.strategy._target_ == "visionft.strategies.Full"


def test_unknown_strategy_lists_the_valid_ones(tmp_path):
    with pytest.raises(Exception) as e:
        compose_cfg(["strategy=nope"], tmp_path)
    assert "linear_probe" in str(e.value) and "full" in str(e.value)


@pytest.mark.slow
def test_configs_are_found_from_a_non_editable_install(tmp_path):
    """Build the wheel, install it into a folder and compose from there: the YAMLs ship inside the package."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(root),
                    "-w", str(wheels)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("visionft-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import visionft.conf, visionft.report.run, hydra; from hydra import compose, initialize_config_module\n"
            "with initialize_config_module('visionft.conf', version_base='1.3'):\n"
            "    cfg = compose('config', overrides=['strategy=ulmfit', 'backbone=dinov2_small'])\n"
            "print(visionft.conf.__file__); print(cfg.strategy.layer_decay, cfg.backbone.name)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    conf_file, values = r.stdout.splitlines()[:2]
    assert conf_file.startswith(str(target))  # not the source tree
    assert values == "0.75 vit_small_patch14_dinov2.lvd142m"
