"""Optional ``torch.compile`` with a clean fallback: compile, run one real training step (forward and backward) on
a batch of the run's data, and keep eager mode if anything fails. Seen here: inductor crashed in the backward of
ResNet-18 at 32 px with channels_last, so a compile that merely succeeds is not enough."""
from __future__ import annotations

import copy
import logging

import torch

log = logging.getLogger(__name__)


def maybe_compile(module, datamodule, **compile_kwargs) -> bool:
    """Run ``module`` through a compiled ``module.model`` if a trial step passes; returns whether it does."""
    eager = module.model
    state = copy.deepcopy(eager.state_dict())  # the trial step may update BatchNorm statistics: undo it
    try:
        x, y = next(iter(datamodule.train_dataloader()))
        module.use_compiled(torch.compile(eager, **compile_kwargs))
        module.train()
        loss = torch.nn.functional.cross_entropy(module(x.to(module.device)), y.to(module.device))
        loss.backward()
        ok = True
    except Exception as e:  # noqa: BLE001 - any compiler failure means eager
        log.warning("torch.compile failed (%s: %s); training in eager mode", type(e).__name__, str(e)[:200])
        module.use_compiled(None)
        ok = False
    finally:
        eager.load_state_dict(state)
        eager.zero_grad(set_to_none=True)
    return ok
