"""The probe engine against scikit-learn: the same frozen features (real EfficientNet-Lite0 on digits), an L2
strength chosen on the same validation split; the L-BFGS head must match LogisticRegression's test accuracy."""
from __future__ import annotations

import pytest
import torch

from conftest import compose_cfg
from visionft.features import embed
from visionft.probe import solve
from visionft.train import build


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    cfg = compose_cfg(["strategy=linear_probe"], tmp_path_factory.mktemp("probe"))  # digits, 48 px, ImageNet weights
    dm, backbone, module = build(cfg)
    dm.setup()
    out = {}
    for split in ("train", "val", "test"):
        loader = torch.utils.data.DataLoader(dm.dataset(split, train_aug=False), batch_size=128)
        out[split] = embed(backbone.model, loader, module.normalize)
    return out, dm.num_classes


def test_lbfgs_probe_matches_sklearn_on_the_same_features(features):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (train, val, test), k = (features[0][s] for s in ("train", "val", "test")), features[1]
    fit = solve(train, val, k)
    ours = ((test[0] @ fit.weight.T + fit.bias).argmax(1) == test[1]).float().mean().item()
    scaler = StandardScaler().fit(train[0].numpy())
    best = None
    for c in [10.0 ** e for e in range(-3, 4)]:  # C tuned on the same validation split
        clf = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(train[0].numpy()), train[1].numpy())
        acc = clf.score(scaler.transform(val[0].numpy()), val[1].numpy())
        if best is None or acc > best[0]:
            best = (acc, clf)
    reference = best[1].score(scaler.transform(test[0].numpy()), test[1].numpy())
    assert ours >= reference - 0.005, (ours, reference, fit.l2, fit.path)
    assert ours > 0.9  # far above chance (0.1): the features are real ImageNet features
    assert len(fit.path) == 9 and fit.val_acc == max(a for _, a in fit.path)


def test_solve_folds_standardization_into_the_head():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 4.0
    y = (x[:, 0] + x[:, 1] / 10 > 4.5).long()
    fit = solve((x, y), (x, y), 2, grid=[1e-4])
    assert ((x @ fit.weight.T + fit.bias).argmax(1) == y).float().mean() > 0.95


def test_embedding_a_convnet_in_nhwc_gives_the_plain_forward_and_leaves_the_model_as_it_was(features, tmp_path):
    """embed runs a convnet in channels_last for speed: its features must be what the plain (NCHW) forward gives,
    and the model must come back in NCHW and train mode (LP-FT fine-tunes it next)."""
    cfg = compose_cfg(["strategy=linear_probe"], tmp_path)
    dm, backbone, module = build(cfg)
    dm.setup()
    model = backbone.model.train()
    x, _ = next(iter(torch.utils.data.DataLoader(dm.dataset("val", train_aug=False), batch_size=16)))
    loader = [(x, torch.zeros(len(x), dtype=torch.long))]
    feats, _ = embed(model, loader, module.normalize)
    assert model.training
    assert all(p.is_contiguous() for p in model.parameters())
    with torch.no_grad():
        plain = model.eval().forward_head(model.forward_features(module.normalize(x).contiguous()), pre_logits=True)
    torch.testing.assert_close(feats, plain, rtol=1e-4, atol=1e-4)
