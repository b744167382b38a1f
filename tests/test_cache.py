"""The cache folder: features kept per image (a seed sweep embeds each image once), the library versions in the key,
the size cap with least-recently-used eviction, stale temporaries, an unwritable or full folder, ``visionft cache``."""
from __future__ import annotations

import logging
import os
import resource
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionft import cachedir
from visionft.probe import ProbeSpec, run_probe
from visionft.train import build, train


def _folder(root: Path, classes: int = 3, per_class: int = 10) -> Path:
    """root/<class>/*.png (no split folders: val and test are carved from it by data.seed)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.uniform(40, 215, 3) * (c + 1) / classes + rng.normal(0, 30, (24, 28, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def _probe(tiny_cfg, tmp_path, *overrides, cache=True, precision="32-true"):
    from conftest import TINY, compose_cfg

    if any(o.startswith("data=") for o in overrides):  # another dataset: the tiny settings of synthetic data left out
        cfg = compose_cfg([o for o in TINY if not o.startswith("data")] + ["strategy=linear_probe", *overrides],
                          tmp_path / "run")
    else:
        cfg = tiny_cfg("strategy=linear_probe", *overrides, output_dir=tmp_path / "run")
    torch.manual_seed(0)  # the same random-init backbone in every build
    dm, _, module = build(cfg)
    return dm, run_probe(module, dm, ProbeSpec(cache=cache), tmp_path / "cache" if cache else None,
                         precision=precision)


def _blocks(cache: Path) -> list[Path]:
    return sorted((cache / "features").rglob("*.safetensors"))


@pytest.mark.parametrize("data", ["folder", pytest.param("memory", marks=pytest.mark.slow)])
def test_a_seed_sweep_over_the_same_images_embeds_each_image_once(tiny_cfg, tmp_path, data):
    """data.seed re-splits the same images: the second seed's splits are assembled from the first's rows, nothing
    embedded, and every row is the feature of its own image (as embedding that split afresh gives)."""
    over = (["data=imagefolder", f"data.root={_folder(tmp_path / 'imgs')}", "data.num_workers=0", "data.image_size=32",
             f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.2", "data.test_fraction=0.2"]
            if data == "folder" else ["data=digits", "data.image_size=16", "data.per_class=null"])
    dm0, first = _probe(tiny_cfg, tmp_path, *over, "data.seed=0")
    dm1, second = _probe(tiny_cfg, tmp_path, *over, "data.seed=1")
    assert first.summary()["embedded"] == ["test", "train", "val"]
    assert second.summary()["embedded"] == [] and second.summary()["cache_hits"] == ["test", "train", "val"]
    images = lambda dm, s: dm.splits[s].images if data == "folder" else dm.splits[s].images.tobytes()  # noqa: E731
    assert images(dm0, "train") != images(dm1, "train")  # the seeds really split differently
    _, fresh = _probe(tiny_cfg, tmp_path, *over, "data.seed=1", cache=False)
    for s in ("train", "val", "test"):
        assert torch.equal(second.features[s].y, fresh.features[s].y)
        assert torch.allclose(second.features[s].x, fresh.features[s].x, atol=1e-5), s
    assert len(_blocks(tmp_path / "cache")) == 1  # one block: every image of the first run, stored once


@pytest.mark.parametrize("library", ["PIL", "cv2", "albumentations"])
def test_the_key_holds_the_versions_of_the_libraries_that_read_and_resize(tiny_cfg, tmp_path, monkeypatch, library):
    import importlib

    _, first = _probe(tiny_cfg, tmp_path)
    monkeypatch.setattr(importlib.import_module(library), "__version__", "0.0.0-other")
    _, second = _probe(tiny_cfg, tmp_path)
    assert first.summary()["embedded"] == second.summary()["embedded"] == ["test", "train", "val"]


def test_the_cap_evicts_the_least_recently_used_entries(tiny_cfg, tmp_path, monkeypatch):
    """Two runs with other weights (seed), each one block of the same size, the second under a cap of 1.5 blocks:
    the first run's block is removed."""
    monkeypatch.setattr(cachedir, "_state", dict(cachedir._state))  # the cap the runs set ends with this test
    cache = tmp_path / "cache"
    base = ["strategy=linear_probe", f"paths.cache_dir={cache}"]
    train(tiny_cfg(*base, "seed=1", "data.seed=0", output_dir=tmp_path / "a"))
    (one,) = _blocks(cache)
    cap = 1.5 * one.stat().st_size / 1e9
    train(tiny_cfg(*base, "seed=2", "data.seed=0", f"++paths.cache_max_gb={cap}", output_dir=tmp_path / "b"))
    (two,) = _blocks(cache)
    assert two != one and not one.exists()
    assert sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) <= cap * 1e9


def test_eviction_goes_by_last_use_and_reading_counts_as_use(tmp_path, monkeypatch):
    from visionft.featurecache import FeatureCache
    from visionft.features import Features

    cache = FeatureCache(tmp_path, kind="images")
    x = torch.arange(30_000, dtype=torch.float32).view(100, 300)
    for name in ("a", "b"):
        cache.write({"entry": name}, Features(x, torch.zeros(100, dtype=torch.long)))
    a, b = cache.path({"entry": "a"}), cache.path({"entry": "b"})
    past = time.time() - 3600
    os.utime(a, (past, past)), os.utime(b, (past + 1, past + 1))  # a written before b
    assert cache.read({"entry": "a"}) is not None  # ... but read after it
    monkeypatch.setattr(cachedir, "_state", {"max_gb": 2.5 * a.stat().st_size / 1e9})
    cache.write({"entry": "c"}, Features(x + 1, torch.zeros(100, dtype=torch.long)))
    assert a.exists() and not b.exists() and cache.path({"entry": "c"}).exists()


def test_stale_temporaries_are_removed_and_fresh_ones_kept(tiny_cfg, tmp_path):
    cache = tmp_path / "cache"
    (cache / "features" / "x").mkdir(parents=True), (cache / "images").mkdir()
    stale = [cache / "features" / "x" / ".blk.safetensors.host.1.tmp", cache / "images" / ".e.json.host.2.tmp"]
    fresh = cache / "features" / ".blk.safetensors.host.3.tmp"  # a writer at work in another process
    for f in (*stale, fresh):
        f.write_bytes(b"partial")
    old = time.time() - 2 * 3600
    for f in stale:
        os.utime(f, (old, old))
    _probe(tiny_cfg, tmp_path)
    assert not any(f.exists() for f in stale) and fresh.exists()


def test_an_unwritable_cache_folder_is_reported_once_and_the_run_goes_on(tiny_cfg, tmp_path, caplog, monkeypatch):
    """The cache folder below a plain file cannot be created (as a read-only folder cannot be written)."""
    monkeypatch.setattr(cachedir, "_unwritable", set())
    (tmp_path / "a_file").write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        m = train(tiny_cfg("strategy=linear_probe", f"paths.cache_dir={tmp_path / 'a_file' / 'cache'}",
                           output_dir=tmp_path / "run"))
    assert m["probe"]["embedded"] == ["test", "train", "val"] and m["test"]["test/acc"] >= 0
    warned = [r for r in caplog.records if "cannot write the cache folder" in r.getMessage()]
    assert len(warned) == 1 and "continuing without caching" in warned[0].getMessage()


def test_a_full_cache_folder_is_reported_once_and_the_run_goes_on(tiny_cfg, tmp_path, caplog, monkeypatch):
    """Writes past a file-size limit fail inside safetensors as on a full disk (an I/O error in its writer)."""
    monkeypatch.setattr(cachedir, "_unwritable", set())
    cfg = tiny_cfg("strategy=linear_probe", output_dir=tmp_path / "run")
    torch.manual_seed(0)
    dm, _, module = build(cfg)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        with caplog.at_level(logging.WARNING):
            run = run_probe(module, dm, ProbeSpec(), tmp_path / "cache")
            again = run_probe(module, dm, ProbeSpec(), tmp_path / "cache")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert run.summary()["embedded"] == again.summary()["embedded"] == ["test", "train", "val"]
    warned = [r.getMessage() for r in caplog.records if "cannot write the cache folder" in r.getMessage()]
    assert len(warned) == 1 and "File too large" in warned[0], warned
    assert [f for f in (tmp_path / "cache").rglob("*") if f.is_file()] == []  # no temporary left behind


def test_the_cache_command_shows_and_clears(tiny_cfg, tmp_path, capsys):
    from visionft.cli import run

    cache = tmp_path / "cache"
    _probe(tiny_cfg, tmp_path)
    (cache / "images").mkdir()
    (cache / "images" / "e.json").write_text("{}" * 500)
    sizes = {k: sum(f.stat().st_size for f in (cache / k).rglob("*") if f.is_file()) for k in ("features", "images")}
    assert run("cache", ["--dir", str(cache)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["features"].split()[1] == "1" and f"{sizes['features']:,} bytes" in lines["features"]
    assert lines["images"].split()[1] == "1" and f"{sizes['images']:,} bytes" in lines["images"]
    assert f"{sum(sizes.values()):,} bytes" in lines["total"] and "paths.cache_max_gb=20" in lines["cache"]
    assert run("cache", ["--dir", str(cache), "--clear", "features"]) == 0
    assert not _blocks(cache) and (cache / "images" / "e.json").exists()
    assert run("cache", ["--dir", str(cache), "--clear"]) == 0
    assert not (cache / "images" / "e.json").exists()


def test_a_bad_cap_is_a_usage_error(tiny_cfg, tmp_path):
    from visionft.errors import UsageError

    with pytest.raises(UsageError, match=r"paths.cache_max_gb=-1 must be a number of GB >= 0"):
        train(tiny_cfg("strategy=linear_probe", "++paths.cache_max_gb=-1", output_dir=tmp_path / "run"))


def test_a_folder_evicted_between_mkdir_and_write_is_made_again(tmp_path, monkeypatch):
    """Another process's eviction removes an emptied key folder: the write makes it again instead of turning the
    cache off for the rest of the run."""
    import safetensors.torch

    from visionft import cachedir

    real, calls = safetensors.torch.save_file, []

    def racing(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 1:
            Path(filename).parent.rmdir()  # the folder vanishes just before the first write
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", racing)
    path = tmp_path / "features" / "key" / "block.safetensors"
    assert cachedir.save_tensors(tmp_path, path, {"x": torch.ones(2)}, {"key": "k"}) and path.is_file()
    assert len(calls) == 2
