"""The cached linear probe as a run: its checkpoint evaluated on images by a plain loop, the feature cache (reuse,
staleness, corruption, opt-out, augmented views), kNN against scikit-learn, LP-FT's starting head and WiSE-FT."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import visionft
from visionft.probe import ProbeSpec, knn_scores, run_probe
from visionft.train import build, train


def _plain_eval(run_dir: Path, cfg, split: str = "test") -> tuple[float, float]:
    """Accuracy and mean cross-entropy of a run's final checkpoint on the split's images: a plain loop over the
    datamodule's evaluation images, preprocessed from the checkpoint's own metadata."""
    trained = visionft.load(run_dir)
    dm, _, _ = build(cfg)
    ds = dm.dataset(split)
    x = torch.stack([ds[i][0] for i in range(len(ds))]).float()
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    mean = torch.tensor(trained.meta["mean"]).view(1, -1, 1, 1) * 255
    std = torch.tensor(trained.meta["std"]).view(1, -1, 1, 1) * 255
    with torch.no_grad():
        logits = trained.model((x - mean) / std)
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def _cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "features").rglob("*.safetensors"))


def test_probe_run_is_a_normal_checkpoint_whose_metrics_match_a_plain_loop(tiny_cfg, tmp_path):
    cfg = tiny_cfg("strategy=linear_probe", f"paths.cache_dir={tmp_path / 'cache'}", output_dir=tmp_path / "run")
    m = train(cfg)
    assert m["epochs"] == 0 and m["final_checkpoint"].endswith("final.ckpt")
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()  # no gradient epoch ran
    acc, loss = _plain_eval(tmp_path / "run", cfg)
    assert m["test"]["test/acc"] == pytest.approx(acc, abs=1e-6)
    assert m["test"]["test/loss"] == pytest.approx(loss, rel=1e-4)
    sd = torch.load(m["final_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert m["trainable_params"] == sd["model.fc.weight"].numel() + sd["model.fc.bias"].numel()  # the head only
    assert sorted(m["probe"]["embedded"]) == ["test", "train", "val"] and m["probe"]["cache_hits"] == []
    assert set(m["probe"]["knn"]) == {"k=10", "k=20", "k=100"} and "test" in m["probe"]["knn"]["k=20"]  # 144 train
    assert len(_cache_files(tmp_path / "cache")) == 1  # one block: the rows of the three splits
    from visionft.export import export  # export accepts it and checks its own parity against the eager model

    artifact, report = export(m["final_checkpoint"], "torchscript", tmp_path / "export")
    assert artifact.is_file() and report["inputs"]


def _rows(block: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(block), framework="pt") as f:
        return f.get_slice("ids").get_shape()[0]


def test_cache_is_reused_and_rebuilt_when_stale_or_corrupt(tiny_cfg, tmp_path, caplog):
    cache = tmp_path / "cache"
    base = ["strategy=linear_probe", f"paths.cache_dir={cache}"]
    first = train(tiny_cfg(*base, output_dir=tmp_path / "a"))
    again = train(tiny_cfg(*base, output_dir=tmp_path / "b"))
    assert again["probe"]["embedded"] == [] and again["probe"]["cache_hits"] == ["test", "train", "val"]
    assert again["test"] == first["test"] and again["probe"]["l2"] == first["probe"]["l2"]
    # other weights (same data): every split is embedded again
    reinit = train(tiny_cfg(*base, "seed=7", "data.seed=42", output_dir=tmp_path / "c"))
    assert reinit["probe"]["embedded"] == ["test", "train", "val"]
    # a subset of the same images (a few-shot training split): read from the rows already embedded
    fewer = train(tiny_cfg(*base, "data.per_class=5", output_dir=tmp_path / "d"))
    assert fewer["probe"]["embedded"] == [] and fewer["probe"]["cache_hits"] == ["test", "train", "val"]
    # other test images (synthetic test images depend on their number), the same train and val: test alone embedded
    other = train(tiny_cfg(*base, "data.test_size=30", output_dir=tmp_path / "e"))
    assert other["probe"]["embedded"] == ["test"]
    # that run reads two blocks (train and val: the first run's; test: its own). A truncated block and one whose
    # tensor bytes were altered are reported and removed, and their rows embedded again, never used
    (test_block,) = [b for b in _cache_files(cache) if _rows(b) == 30]  # the 30 test images
    (first_block,) = [b for b in test_block.parent.glob("*.safetensors") if b != test_block]  # the first run's
    assert _rows(first_block) == 160 + 40  # its train, val and test images
    first_block.write_bytes(first_block.read_bytes()[:100])
    raw = bytearray(test_block.read_bytes())
    raw[-8:] = bytes(8 - i for i in range(8))
    test_block.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="visionft.featurecache"):
        healed = train(tiny_cfg(*base, "data.test_size=30", output_dir=tmp_path / "f"))
    assert healed["probe"]["embedded"] == ["test", "train", "val"]
    assert "unreadable" in caplog.text and "checksum" in caplog.text
    assert not first_block.exists() and not test_block.exists()
    assert healed["test"] == other["test"]


def test_cache_false_writes_nothing(tiny_cfg, tmp_path):
    m = train(tiny_cfg("strategy=linear_probe", "strategy.cache=false", f"paths.cache_dir={tmp_path / 'cache'}",
                       output_dir=tmp_path / "run"))
    assert not (tmp_path / "cache").exists() and m["probe"]["embedded"] == ["test", "train", "val"]


def test_augmented_views_are_seeded_distinct_and_cached(tiny_cfg, tmp_path):
    cfg = tiny_cfg("strategy=linear_probe", "strategy.cache_views=2", "data.augment.name=crop_flip",
                   output_dir=tmp_path / "run")
    torch.manual_seed(0)  # the same random-init backbone for both builds
    dm, _, module = build(cfg)
    spec = ProbeSpec(cache_views=2)
    first = run_probe(module, dm, spec, tmp_path / "cache")
    n = dm.sizes()["train"]
    x = first.features["train"].x
    assert module.model.training  # embedding left the model in the mode it had (a fine-tuning phase may follow)
    assert x.shape[0] == 2 * n and torch.equal(first.features["train"].y[:n], first.features["train"].y[n:])
    assert not torch.allclose(x[:n], x[n:])  # two different augmented views of each image
    torch.manual_seed(0)
    dm2, _, module2 = build(cfg)
    second = run_probe(module2, dm2, spec, tmp_path / "cache")
    assert second.features["train"].hit and torch.equal(second.features["train"].x, x)
    fresh = run_probe(module2, dm2, ProbeSpec(cache_views=2, cache=False), None)  # recomputed: same seeded views
    assert torch.allclose(fresh.features["train"].x, x, atol=1e-5)


def test_knn_matches_scikit_learn():
    from sklearn.neighbors import KNeighborsClassifier

    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(300, 16, generator=g), torch.randn(100, 16, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    ours1 = knn_scores((bank, labels), query, 5, ks=(1,))[1].argmax(1).numpy()
    ref1 = KNeighborsClassifier(1, metric="cosine").fit(bank.numpy(), labels.numpy()).predict(query.numpy())
    assert (ours1 == ref1).all()
    # k=7, DINOv2's temperature: the neighbours scikit-learn finds, each voting exp(cosine similarity / 0.07)
    from sklearn.neighbors import NearestNeighbors

    dist, idx = NearestNeighbors(n_neighbors=7, metric="cosine").fit(bank.numpy()).kneighbors(query.numpy())
    expected = np.zeros((100, 5))
    np.add.at(expected, (np.arange(100)[:, None].repeat(7, 1), labels.numpy()[idx]), np.exp((1 - dist) / 0.07))
    ours7 = knn_scores((bank, labels), query, 5, ks=(3, 7), temperature=0.07)[7].numpy()
    assert np.allclose(ours7, expected, rtol=1e-4) and (ours7.argmax(1) == expected.argmax(1)).all()


def test_lp_ft_starts_from_the_probe_and_wise_interpolates(tiny_cfg, tmp_path):
    common = ["strategy=lp_ft", "trainer.max_epochs=2", f"paths.cache_dir={tmp_path / 'cache'}"]
    plain = train(tiny_cfg(*common, output_dir=tmp_path / "plain"))
    cfg = tiny_cfg(*common, "wise.alphas=[0,0.5,1]", output_dir=tmp_path / "wise")
    m = train(cfg)
    curve = {r["alpha"]: r for r in m["wise"]["curve"]}
    # alpha=0 is the start of fit: the probe head on the pretrained backbone, evaluated on images by Lightning,
    # equals the probe's own validation accuracy on cached features
    assert curve[0.0]["val_acc"] == pytest.approx(m["probe"]["val_acc_path"][
        [row[0] for row in m["probe"]["val_acc_path"]].index(m["probe"]["l2"])][1], abs=1e-4)
    # alpha=1 is the fine-tuned model of the same run without WiSE-FT
    assert curve[1.0]["val_acc"] == pytest.approx(plain["val"]["val/acc"], abs=1e-6)
    best = max(m["wise"]["curve"], key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert m["wise"]["alpha"] == best["alpha"] and m["val"]["val/acc"] == pytest.approx(best["val_acc"], abs=1e-6)
    rows = (tmp_path / "wise" / "wise" / "alpha_curve.csv").read_text().splitlines()
    assert rows[0] == "alpha,val_acc,val_loss" and len(rows) == 4
    assert (tmp_path / "wise" / "wise" / "alpha_curve.png").stat().st_size > 0
    # the chosen model is what test (and export, predict) see: its checkpoint evaluated by a plain loop
    acc, _ = _plain_eval(tmp_path / "wise", cfg)
    assert m["test"]["test/acc"] == pytest.approx(acc, abs=1e-6)
    saved = json.loads((tmp_path / "wise" / "metrics.json").read_text())
    assert saved["final_checkpoint"].endswith("final.ckpt") and saved["wise"]["alpha"] == m["wise"]["alpha"]


def test_wise_scales_the_lora_adapter(tiny_cfg, tmp_path):
    """With alpha = 0.5, the merged weight of every adapted layer moved half as far as the fine-tuned adapter's:
    W(0.5) - W0 = 0.5 (W(1) - W0), read through peft's own merge."""
    from visionft.export import load_trained

    cfg = tiny_cfg("strategy=lora", "strategy.r=2", "+backbone.kwargs.zero_init_last=false", "wise.alphas=[0.5]",
                   "trainer.max_epochs=2", output_dir=tmp_path / "run")
    m = train(cfg)
    assert m["wise"]["alpha"] == 0.5
    half, _, _ = load_trained(m["final_checkpoint"])
    full, _, _ = load_trained(m["best_checkpoint"])
    base = torch.load(m["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    moved = 0
    for name, w_half in half.state_dict().items():
        key = f"model.base_model.model.{name.replace('.weight', '.base_layer.weight')}"
        if key in base and w_half.is_floating_point():
            w0, w1 = base[key], full.state_dict()[name]
            assert torch.allclose(w_half - w0, 0.5 * (w1 - w0), atol=1e-6), name
            moved += int(not torch.equal(w1, w0))
    assert moved > 0


def test_wise_needs_a_fine_tuning_run(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="leaves the backbone as it was"):
        train(tiny_cfg("strategy=linear_probe", "wise.alphas=[0,1]", output_dir=tmp_path / "run"))
    with pytest.raises(ValueError, match="leaves the backbone as it was"):  # the gradient head too: start == end
        train(tiny_cfg("strategy=linear_probe", "strategy.solver=adamw", "wise.alphas=[0,1]",
                       output_dir=tmp_path / "r"))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        train(tiny_cfg("strategy=full", "wise.alphas=[0,2]", output_dir=tmp_path / "run"))


def test_probe_beats_chance_by_far_on_learnable_data(tiny_cfg, tmp_path):
    m = train(tiny_cfg("strategy=linear_probe", output_dir=tmp_path / "run"))
    assert m["test"]["test/acc"] > 3 * 0.1 and np.isfinite(m["test"]["test/loss"])


def test_lp_ft_head_at_the_start_of_fit_is_the_probe_on_plain_features(tiny_cfg, tmp_path):
    """alpha = 0 keeps the start of fit: its head must be the L-BFGS solution on features a plain loop computes."""
    from visionft.features import embed
    from visionft.probe import solve

    cfg = tiny_cfg("strategy=lp_ft", "wise.alphas=[0]", output_dir=tmp_path / "run")
    m = train(cfg)
    head = torch.load(m["final_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    torch.manual_seed(cfg.seed)  # train() seeds before building: the same random-init backbone
    dm, backbone, module = build(cfg)
    feats = {s: embed(backbone.model, torch.utils.data.DataLoader(dm.dataset(s, train_aug=False), batch_size=50),
                      module.normalize) for s in ("train", "val")}
    fit = solve(feats["train"], feats["val"], dm.num_classes)
    assert torch.allclose(head["model.fc.weight"], fit.weight, atol=1e-4)
    assert torch.allclose(head["model.fc.bias"], fit.bias, atol=1e-4)


def test_wise_anchor_of_full_fine_tuning_is_the_pretrained_body_with_the_trained_head(tiny_cfg, tmp_path):
    cfg = tiny_cfg("strategy=full", "wise.alphas=[0]", output_dir=tmp_path / "run")
    m = train(cfg)
    chosen = torch.load(m["final_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    end = torch.load(m["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    torch.manual_seed(cfg.seed)
    _, _, start = build(cfg)
    start = start.state_dict()
    for k, v in chosen.items():
        expected = end[k] if k.startswith("model.fc.") or not v.is_floating_point() else start[k]
        assert torch.equal(v, expected), k
    assert any(not torch.equal(end[k], start[k]) for k in end  # the body did move
               if not k.startswith("model.fc.") and end[k].is_floating_point())


@pytest.mark.parametrize("change", ["data.eval_crop_pct=0.8", "trainer.precision=bf16-mixed",
                                    "+backbone.kwargs.act_layer=gelu"])
def test_what_changes_features_misses_the_cache(tiny_cfg, tmp_path, change):
    """Each change alters the features of the same images under the same weights (another eval crop, bf16 autocast,
    another activation in the network): the second run embeds every split again, and its features differ."""
    runs = []
    for overrides in ([], [change]):
        cfg = tiny_cfg("strategy=linear_probe", *overrides, output_dir=tmp_path / "run")
        torch.manual_seed(0)  # the same random-init weights
        dm, _, module = build(cfg)
        runs.append(run_probe(module, dm, ProbeSpec(), tmp_path / "cache", precision=cfg.trainer.precision))
    assert runs[1].summary()["embedded"] == ["test", "train", "val"], change
    assert torch.equal(runs[0].features["test"].y, runs[1].features["test"].y)
    assert not torch.allclose(runs[0].features["test"].x, runs[1].features["test"].x, atol=1e-3), change


def test_knn_bank_is_the_eval_transform_whatever_the_views(tiny_cfg, tmp_path):
    base = ["strategy=linear_probe", f"paths.cache_dir={tmp_path / 'cache'}", "data.augment.name=crop_flip"]
    plain = train(tiny_cfg(*base, output_dir=tmp_path / "a"))
    views = train(tiny_cfg(*base, "strategy.cache_views=2", output_dir=tmp_path / "b"))
    assert views["probe"]["knn"] == plain["probe"]["knn"]
    assert views["probe"]["cache_hits"] == ["test", "train_eval", "val"]  # val, test and the bank: the same entries


def test_a_reused_run_dir_forgets_its_old_final_model(tiny_cfg, tmp_path):
    train(tiny_cfg("strategy=linear_probe", output_dir=tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints" / "final.ckpt").exists()
    m = train(tiny_cfg("strategy=full", "overwrite=true", output_dir=tmp_path / "run"))
    assert (not (tmp_path / "run" / "checkpoints" / "final.ckpt").exists()
            and m["final_checkpoint"].endswith("best.ckpt"))
    loaded = torch.load(m["final_checkpoint"], map_location="cpu", weights_only=True)
    assert loaded["hyper_parameters"]["strategy"]["_target_"].endswith("Full")


@pytest.mark.parametrize("overrides, named", [
    (["loss.class_weights=balanced"], None),
    (["loss.class_weights=balanced", "loss.label_smoothing=0.1", "loss.mixup=0.2"],
     "loss.label_smoothing, loss.mixup do not apply"),
])
def test_the_probe_warns_only_about_options_it_ignores(tiny_cfg, tmp_path, caplog, overrides, named):
    cfg = tiny_cfg("strategy=linear_probe", "strategy.cache=false", *overrides, output_dir=tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="visionft.train"):
        train(cfg)
    warned = [r.getMessage() for r in caplog.records if "closed form" in r.getMessage()]
    assert warned == ([] if named is None else [f"strategy LinearProbe solves its head in closed form on cached "
                                                f"features: {named}"]), warned
