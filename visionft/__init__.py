"""visionft: transfer learning for timm backbones with exact, pluggable adaptation strategies."""
import os

from omegaconf import OmegaConf

# `${first:a,b}`: the first argument that is set. conf/config.yaml uses it so that `paths.output_dir=X` is also
# where Hydra writes its .hydra/ folder and log (Hydra's run dir), while a run without it keeps Hydra's default.
OmegaConf.register_new_resolver("first", lambda *xs: next((x for x in xs if x not in (None, "")), None),
                                replace=True)


def data_workers(most, devices=1) -> int:
    """`${workers:4,<devices>}` (conf/data): at most ``most`` loader workers per training process, and no more than
    Lightning suggests for this machine (``lightning.fabric.utilities.suggested_max_num_workers``): the CPUs this
    process may use, shared by the machine's ``devices`` processes (1 unless an integer), less one, at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = devices if isinstance(devices, int) and devices > 0 else 1
    return min(int(most), max(1, cpus // processes - 1))


OmegaConf.register_new_resolver("workers", data_workers, replace=True)


def __getattr__(name: str):  # the Python API, imported on first use (`import visionft.conf` stays light)
    if name in ("compose", "fit", "load", "Run", "Trained"):
        from visionft import api

        return getattr(api, name)
    raise AttributeError(f"module 'visionft' has no attribute {name!r}")
