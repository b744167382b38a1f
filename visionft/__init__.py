"""visionft: transfer learning for timm backbones with exact, pluggable adaptation strategies."""
from omegaconf import OmegaConf

# `${first:a,b}`: the first argument that is set. conf/config.yaml uses it so that `paths.output_dir=X` is also
# where Hydra writes its .hydra/ folder and log (Hydra's run dir), while a run without it keeps Hydra's default.
OmegaConf.register_new_resolver("first", lambda *xs: next((x for x in xs if x not in (None, "")), None),
                                replace=True)

def __getattr__(name: str):  # the Python API, imported on first use (`import visionft.conf` stays light)
    if name in ("compose", "fit", "load", "Run", "Trained"):
        from visionft import api

        return getattr(api, name)
    raise AttributeError(f"module 'visionft' has no attribute {name!r}")
