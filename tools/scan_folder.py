"""Scan an image folder as a run would and compare what each split holds with the files on disk: images used,
distinct files, files used twice or in two splits, labels that differ from the class folder the file lies in, and val
images taken from a valid/ folder. Usage: python tools/scan_folder.py ROOT

The closing note of #21 ran it on CIFAR-10 JPEGs copied into 200 train / 50 valid / 100 test per class with a planted
symlink loop (ln -s .. ROOT/train/airplane/loop)."""
from __future__ import annotations

import collections
import json
import logging
import os
import sys
import time

from datamodules import ImageFolderDataModule


def scan(root: str) -> dict:
    start = time.time()
    dm = ImageFolderDataModule(root=root, seed=0)
    dm.setup()
    disk = {}
    for here, _, files in os.walk(root):  # the files as the disk holds them (links not followed)
        for f in files:
            if not os.path.islink(os.path.join(here, f)):
                disk[os.path.realpath(os.path.join(here, f))] = os.path.relpath(here, root).split(os.sep)
    used = [(os.path.realpath(p), dm.classes[y], s)
            for s, sp in dm.splits.items() for p, y in zip(sp.images, sp.labels)]
    count = collections.Counter(r for r, _, _ in used)
    splits_of = collections.defaultdict(set)
    for r, _, s in used:
        splits_of[r].add(s)
    return {"sizes": dm.sizes(), "files_on_disk": len(disk), "images_used": len(used),
            "distinct_files_used": len(count), "used_more_than_once": sum(v > 1 for v in count.values()),
            "in_several_splits": sum(len(v) > 1 for v in splits_of.values()),
            "wrong_label": sum(c not in disk.get(r, []) for r, c, _ in used),
            "val_from_valid_folder": sum("/valid/" in p for p in dm.splits["val"].images),
            "seconds": round(time.time() - start, 1)}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(scan(sys.argv[1])))
