"""Group gates: which depth groups train at an epoch, and what that means for parameters, gradients and BatchNorm.

One place enforces a strategy's open set (``Gates``), driven by one callback (``GroupGates``) that checks it at
the start of every training batch, so any way into the loop (a fresh fit, a new epoch, a resume mid-epoch, where
Lightning skips ``on_train_epoch_start``) trains exactly the groups the strategy opened for that epoch.

- Groups that never open are frozen (``requires_grad=False``) before the Trainer starts.
- On one device, groups that open later are hard-frozen until they open (saves their backward). Under a
  multi-device strategy every trainable parameter keeps ``requires_grad`` (a DDP reducer is built once) and a
  closed group's gradients are dropped before the optimizer step: no update, no decay, no Adam state, no clipping.
- BatchNorm: eval mode unless the strategy's ``bn`` policy trains it and its group is open. Modules are looked up
  by name when applied, so BatchNorms that Lightning replaced (``sync_batchnorm``) are the ones governed.
"""
from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from visionft.optim import group_table


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


class Gates:
    def __init__(self, strategy, n_groups: int, depths: dict[str, int], bn_depths: dict[str, int]) -> None:
        self.strategy, self.n_groups, self.depths, self.bn_depths = strategy, n_groups, depths, bn_depths
        self.trainable: set[str] = set()
        self.last_epoch = 0  # the latest epoch whose gates were applied (a resumed run starts from its epoch)

    def is_open(self, depth: int, epoch: int) -> bool:
        return self.strategy.is_open(depth, self.n_groups, epoch)

    def open_set(self, epoch: int) -> tuple[bool, ...]:
        return tuple(self.is_open(d, epoch) for d in range(self.n_groups))

    def freeze_never_open(self, model: nn.Module, trainable=lambda name: True) -> None:
        """Freeze what never trains: parameters the strategy's ``prepare`` does not train (``trainable``) and groups
        it never opens; what is left is every parameter the run may train."""
        for name, p in model.named_parameters():
            opens = self.strategy.open_epoch(self.depths[name], self.n_groups) is not None
            p.requires_grad_(opens and trainable(name))
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def trains_body(self) -> bool:
        """Whether anything below the head ever trains (a body group opens, or an adapter inside one trains)."""
        return any(self.depths[n] < self.n_groups - 1 for n in self.trainable)

    def apply(self, model: nn.Module, epoch: int, toggle_requires_grad: bool) -> list[tuple[nn.Module, bool]]:
        if toggle_requires_grad:
            for name, p in model.named_parameters():
                if name in self.trainable:
                    p.requires_grad_(self.is_open(self.depths[name], epoch))
        return self.apply_bn(model, epoch)

    def bn_trains(self, depth: int, epoch: int) -> bool:
        return self.strategy.bn_trains(depth, self.n_groups, epoch)

    def bn_modes(self, model: nn.Module, epoch: int) -> list[tuple[nn.Module, bool]]:
        """Every BatchNorm module of ``model`` now (looked up by name) and whether it trains at ``epoch``."""
        return [(m, self.bn_trains(self.bn_depths[name], epoch)) for name, m in model.named_modules() if _is_bn(m)]

    def apply_bn(self, model: nn.Module, epoch: int) -> list[tuple[nn.Module, bool]]:
        """Set BatchNorm modes for training at ``epoch``; returns them, for cheap re-application per batch."""
        modes = self.bn_modes(model, epoch)
        for m, trains in modes:
            m.train(trains)
        return modes

    def drop_closed_grads(self, optimizer, epoch: int) -> None:
        for g in optimizer.param_groups:
            if not self.is_open(g["depth"], epoch):
                for p in g["params"]:
                    p.grad = None

    def trained_params(self, model: nn.Module, skip=lambda name: False) -> int:
        """Parameters of groups open in some epoch the run entered (epochs 0..last_epoch; open sets only grow)."""
        return sum(p.numel() for n, p in model.named_parameters() if n in self.trainable and not skip(n)
                   and any(self.is_open(self.depths[n], e) for e in range(self.last_epoch + 1)))

    def rows(self, model: nn.Module, optimizer, group_names: list[str], epoch: int) -> list[dict]:
        """What the optimizer holds now, per param group, plus depth groups frozen for the whole run."""
        bn = {}
        for name, m in model.named_modules():
            if _is_bn(m):
                d = self.bn_depths[name]
                bn.setdefault(d, "train" if self.bn_trains(d, epoch) else "eval")
        rows, seen = [], set()
        for g in optimizer.param_groups if optimizer is not None else []:
            seen.add(g["depth"])
            rows.append(self._row(g["name"], g["depth"], g["params"], g["initial_lr"], g["lr"], g["weight_decay"],
                                  epoch, bn))
        for depth in range(self.n_groups):
            if depth not in seen:
                params = [p for n, p in model.named_parameters() if self.depths[n] == depth]
                rows.append(self._row(group_names[depth], depth, params, 0.0, 0.0, 0.0, epoch, bn, frozen=True))
        return sorted(rows, key=lambda r: r["depth"])

    def _row(self, name, depth, params, base_lr, lr, wd, epoch, bn, frozen=False) -> dict:
        return {"group": name, "depth": depth, "tensors": len(params), "params": sum(p.numel() for p in params),
                "base_lr": float(base_lr), "lr_now": float(lr), "weight_decay": float(wd),
                "trainable": (not frozen) and self.is_open(depth, epoch), "bn": bn.get(depth, "-")}


def table_change(before: list[dict], rows: list[dict]) -> str:
    """The param groups whose training state (``trainable``, ``bn``) differs from ``before``, as a table under one
    line with the count and the parameters that now train."""
    was = {r["group"]: (r["trainable"], r["bn"]) for r in before}
    changed = [r for r in rows if was.get(r["group"]) != (r["trainable"], r["bn"])]
    trains, total = sum(r["params"] for r in rows if r["trainable"]), sum(r["params"] for r in rows)
    head = f"{len(changed)} of {len(rows)} groups changed; {trains:,} of {total:,} parameters now train"
    return head + (":\n" + group_table(changed) if changed else "")


class GroupGates(L.Callback):
    """Applies ``module.gates`` at every training batch whose (epoch, open set) differs from what was applied, keeps
    BatchNorm modes right at every batch, drops closed groups' gradients, and logs the param-group table: in full at
    the first batch, then the groups that changed, once per change of the open set."""

    def __init__(self) -> None:
        self._applied: tuple | None = None
        self._logged: tuple | None = None
        self._rows: list[dict] | None = None  # the table as last logged
        self._bn_modes: list = []  # (module, trains) as applied: re-asserted per batch without walking the model

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        epoch, gates = module.epoch_now(), module.gates
        key = (id(trainer), epoch)
        if key != self._applied:
            self._bn_modes = gates.apply(module.model, epoch, isinstance(trainer.strategy, SingleDeviceStrategy))
            gates.last_epoch = max(gates.last_epoch, epoch)
            self._applied = key
            state = gates.open_set(epoch)
            if state != self._logged:
                self._logged, before, self._rows = state, self._rows, module.param_group_rows()
                rank_zero_info(f"param groups at epoch {epoch} ({gates.strategy.name}):" + (
                    "\n" + group_table(self._rows) if before is None else " " + table_change(before, self._rows)))
        else:  # cheap: modes only (validation and .train() calls in between must not leave BatchNorm training)
            for m, trains in self._bn_modes:
                if m.training is not trains:  # nn.Module.__setattr__ is slow: set only what changed
                    m.training = trains

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        module.gates.drop_closed_grads(optimizer, module.epoch_now())
