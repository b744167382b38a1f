"""Adaptation strategies. One file per family; each is chosen by the Hydra group ``strategy`` (its YAML's
``_target_``), so the config group is the only registry."""
from visionft.strategies.adapter import Adapter
from visionft.strategies.base import BN_POLICIES, Strategy
from visionft.strategies.basic import Full, Partial, Scratch
from visionft.strategies.bitfit import BitFit
from visionft.strategies.gradual import GradualUnfreeze
from visionft.strategies.lora import Lora
from visionft.strategies.peft_methods import Peft
from visionft.strategies.probe import LinearProbe, LpFt
from visionft.strategies.ssf import Ssf
from visionft.strategies.vpt import Vpt

__all__ = ["BN_POLICIES", "Strategy", "Scratch", "LinearProbe", "Full", "Partial", "GradualUnfreeze", "Lora", "BitFit",
           "Vpt", "LpFt", "Peft", "Ssf", "Adapter"]
