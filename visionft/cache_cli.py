"""``visionft cache``: what the cache folder holds (size and entries per kind, the cap), and clearing it."""
from __future__ import annotations

import argparse
from pathlib import Path

from visionft import cachedir


def _configured() -> tuple[str, float | None]:
    """``paths.cache_dir`` and ``paths.cache_max_gb`` as a run would compose them (``$VISIONFT_CACHE_DIR``)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("visionft.conf", version_base="1.3"):
        cfg = compose("config")
    return str(cfg.paths.cache_dir), cfg.paths.get("cache_max_gb", cachedir.DEFAULT_MAX_GB)


def _size(n: int) -> str:
    unit, scale = next(((u, f) for u, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if n >= f), (None, 1))
    return f"{n / scale:.1f} {unit} ({n:,} bytes)" if unit else f"{n:,} bytes"


def cache_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="visionft cache", description="Show the cache folder (paths.cache_dir): size "
                                "and entries of cached features and decoded images, and the cap "
                                "(paths.cache_max_gb); --clear empties it.")
    p.add_argument("--dir", default=None, help="the cache folder (default: paths.cache_dir, $VISIONFT_CACHE_DIR)")
    p.add_argument("--clear", nargs="?", const="all", default=None, choices=["all", *cachedir.KINDS],
                   help="remove every entry (or only features or images)")
    a = p.parse_args(argv)
    root, cap = _configured()
    root = Path(a.dir or root).expanduser()
    if a.clear:
        kinds = cachedir.KINDS if a.clear == "all" else (a.clear,)
        freed = cachedir.clear(root, kinds)
        print(f"cleared {', '.join(kinds)} in {root}: {_size(freed)} freed")
    use = cachedir.usage(root)
    print(f"cache {root} (cap paths.cache_max_gb={cap}{'' if cap is None else ' GB'})")
    for kind in (*cachedir.KINDS, "tmp"):
        if kind != "tmp" or use[kind][1]:
            label = "temporary" if kind == "tmp" else kind
            print(f"  {label:<10} {use[kind][1]:>7} files  {_size(use[kind][0])}")
    total = sum(b for b, _ in use.values()), sum(n for _, n in use.values())
    print(f"  {'total':<10} {total[1]:>7} files  {_size(total[0])}")
    return 0
