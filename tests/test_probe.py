"""The probe engine against scikit-learn: the same frozen features (real EfficientNet-Lite0 on digits), an L2
strength chosen on the same validation split; the L-BFGS head must match LogisticRegression's test accuracy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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


def _objective(fit, x, y, l2, weights=None) -> float:
    """The weighted probe objective, by hand: sum_i w_i CE_i / sum_i w_i + l2 / 2 * ||W||^2 (float64). scikit-learn's
    sum_i w_i CE_i + ||W||^2 / (2C) is the same times sum_i w_i when C = 1 / (sum_i w_i * l2)."""
    w, b = (t.double() for t in fit)
    sw = torch.ones(len(y), dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()[y]
    ce = F.cross_entropy(x.double() @ w.T + b, y, reduction="none")
    return ((sw * ce).sum() / sw.sum() + 0.5 * l2 * (w * w).sum()).item()


def test_class_weighted_probe_minimizes_sklearns_balanced_objective(features):
    """loss.class_weights=balanced in the L-BFGS probe: on an imbalanced train split of real features (all of digits
    0-4, 6 images of each of 5-9; the 64 most varying feature columns, standardized, so that both solvers fit the
    same matrix), the weighted head reaches the minimum of scikit-learn's class_weight="balanced" objective (its own
    weights, n / (K * n_c)), which the unweighted head is far from; the weighted head finds the rare digits the
    unweighted one misses."""
    from sklearn.linear_model import LogisticRegression

    from visionft.build import class_weights

    (train, val, test), k, l2 = (features[0][s] for s in ("train", "val", "test")), features[1], 0.1
    keep = torch.cat([torch.nonzero(train[1] == c).flatten()[: None if c < 5 else 6] for c in range(k)])
    cols = train[0][keep].std(0).topk(64).indices  # the 64 most varying feature columns
    x, y = train[0][keep][:, cols], train[1][keep]
    mean, std = x.mean(0), x.std(0)
    xs, vxs, txs = ((a - mean) / std for a in (x, val[0][:, cols], test[0][:, cols]))
    weights = class_weights("balanced", torch.bincount(y, minlength=k).numpy())
    weighted = solve((xs, y), (vxs, val[1]), k, grid=[l2], class_weights=weights)
    plain = solve((xs, y), (vxs, val[1]), k, grid=[l2])
    clf = LogisticRegression(C=1 / (len(y) * l2), class_weight="balanced", tol=1e-8, max_iter=10000)
    clf.fit(xs.double().numpy(), y.numpy())  # balanced weights sum to n
    reference = _objective((torch.from_numpy(clf.coef_), torch.from_numpy(clf.intercept_)), xs, y, l2, weights)
    ours = _objective((weighted.weight, weighted.bias), xs, y, l2, weights)
    assert ours == pytest.approx(reference, rel=5e-4, abs=0), (ours, reference)  # 0.80629 vs 0.80623
    assert _objective((plain.weight, plain.bias), xs, y, l2, weights) > 1.5 * reference
    sk_pred = torch.from_numpy(clf.predict(txs.double().numpy()))
    pred = lambda fit: (txs @ fit.weight.T + fit.bias).argmax(1)  # noqa: E731
    assert (pred(weighted) == sk_pred).float().mean() > 0.99
    minority = test[1] >= 5
    recall = lambda fit: (pred(fit) == test[1])[minority].float().mean().item()  # noqa: E731
    assert recall(weighted) > recall(plain) + 0.2  # 0.53 vs 0.0: the weights change what the head predicts
