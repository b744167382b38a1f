"""``visionft --help``: conf/config.yaml sets Hydra's help template (the commands, then the config groups, then the
composed config). ``${visionft_groups:row}`` lists the config groups as Hydra's ``$APP_CONFIG_GROUPS`` does (every
search path, plugins' groups included), without Hydra's own and without the groups named (``row``: the rows of the
results table (docs/results/README.md), which ``experiment=cifar10_table`` sweeps)."""
from __future__ import annotations

from omegaconf import OmegaConf


def groups(*hidden: str) -> str:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    loader = GlobalHydra.instance().config_loader()
    found: list[str] = []

    def walk(parent: str) -> None:
        for name in loader.list_groups(parent):
            group = f"{parent}/{name}" if parent else name
            if group.split("/")[0] in ("hydra", *hidden):
                continue
            if loader.get_group_options(group, ObjectType.CONFIG):
                found.append(group)
            if loader.get_group_options(group, ObjectType.GROUP):
                walk(group)

    walk("")
    return "\n".join(f"{g}: {', '.join(sorted(loader.get_group_options(g)))}" for g in sorted(found))


def register() -> None:
    OmegaConf.register_new_resolver("visionft_groups", groups, replace=True)
