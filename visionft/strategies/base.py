"""The strategy contract.

A strategy answers three questions about the ordered depth groups of a backbone (stem ... head), and nothing
else: the training loop, optimizer and scheduler are shared and know no strategy by name.

1. ``open_epoch(i, n)``: from which epoch group ``i`` of ``n`` trains; ``None`` = never (frozen for the run).
2. ``lr_scale(i, n, param_name)``: a constant LR multiplier (layer-wise decay, LoRA+ ratio for B matrices).
3. ``prepare(model, backbone) -> Adapted``: structural changes before training (freezing parts, wrapping with peft,
   adding prompt tokens); what it adds or wraps is declared by the returned ``visionft.adapted.Adapted`` (depth group
   of every new parameter, plain names, what trains, how to deploy, the artifact), so no core module knows a wrapper.

and declares a BatchNorm policy ``bn``: ``frozen`` keeps every BatchNorm in eval mode (running statistics from
pretraining untouched; affine weights still train where their group trains), ``train`` lets BatchNorm of open groups
update batch statistics. BatchNorm of a group that is not open is always in eval mode.

How a schedule is enforced (see ``visionft.optim``): every optimizer param group exists from step 0; a group's LR is
base_schedule(step) x lr_scale x [group open at this step's epoch]. Groups never opened are frozen with
``requires_grad=False`` before the Trainer starts (fixed for the run, so DDP-safe). Groups that open later keep
``requires_grad=True`` under any multi-device strategy (a DDP reducer must see them from the start) and their
gradients are dropped while closed; on one device they are hard-frozen until they open, which saves their backward
compute. Either way a closed group receives no update, no weight decay and no optimizer state, so Adam state starts
fresh when it opens, and gradient clipping (which only sees gradients that exist) covers open groups only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import nn

from visionft.adapted import Adapted
from visionft.errors import UsageError
from visionft.weights import is_under

BN_POLICIES = ("frozen", "train")


def write_safetensors(state: dict, path: Path, what: str) -> Path:
    """Write ``state`` (its tensors detached, contiguous, on the CPU) to ``path`` as safetensors, atomically (the
    previous file stays on a failed write); ``what`` names the file in an error. Returns ``path``."""
    from safetensors.torch import save_file

    from visionft.atomic import replacing

    with replacing(path, what) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    return path


def train_only_head(model: nn.Module, head: str) -> None:
    """Freeze every parameter of ``model`` outside module ``head`` (the classifier); the head's parameters train."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_under(name, head))


@dataclass
class Strategy:
    lr: float = 5e-4  # base learning rate (per-strategy default in its YAML)
    bn: str = "frozen"
    layer_decay: float = 1.0  # LR of group i = lr * layer_decay ** (distance from the head); 1.0 = off

    uses_pretrained: ClassVar[bool] = True  # False: the backbone is built with random init

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise UsageError(f"strategy.lr={self.lr} must be > 0 (e.g. strategy.lr=5e-4)")
        if self.bn not in BN_POLICIES:
            raise UsageError(f"strategy.bn={self.bn!r} is not a BatchNorm policy; valid: {', '.join(BN_POLICIES)}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise UsageError(f"strategy.layer_decay={self.layer_decay} must be in (0, 1]; 1.0 turns it off")

    @property
    def name(self) -> str:
        return type(self).__name__

    def validate(self, n_groups: int) -> None:
        """Check options against the backbone's number of depth groups; raise ValueError naming the range."""

    def open_epoch(self, index: int, n_groups: int) -> int | None:
        return 0

    def lr_scale(self, index: int, n_groups: int, param_name: str) -> float:
        return self.layer_decay ** (n_groups - 1 - index)

    def prepare(self, model: nn.Module, backbone) -> Adapted:
        return Adapted(model, backbone)

    def phase_starts(self, n_groups: int) -> list[int]:
        """Epochs at which a new phase begins: warmup and the schedule restart there (one phase by default)."""
        return [0]

    def head_probe(self):
        """``visionft.probe.ProbeSpec`` when the head starts as a linear probe fitted on cached frozen features
        (before any gradient step); None: the head starts as the backbone built it."""
        return None

    @property
    def gradient_fit(self) -> bool:
        """False when the strategy is done once its head is probed (no gradient epoch runs)."""
        return True

    def post_fit(self, adapted: Adapted, trainer, datamodule) -> None:
        """A step after fit and before the final evaluation (weight interpolation, a probe head); default none."""

    def save_artifacts(self, adapted: Adapted, out) -> list:
        """Files a strategy writes next to the checkpoints after the run (e.g. a LoRA adapter); default none."""
        return []

    # -- derived, shared --------------------------------------------------------------------------------------
    def is_open(self, index: int, n_groups: int, epoch: int) -> bool:
        start = self.open_epoch(index, n_groups)
        return start is not None and epoch >= start

    def bn_trains(self, index: int, n_groups: int, epoch: int) -> bool:
        return self.bn == "train" and self.is_open(index, n_groups, epoch)
