"""Running a model over images with temporary hooks on named layers."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


@torch.no_grad()
def run_with_hooks(model: nn.Module, hooks: dict[str, Callable], images: torch.Tensor, batch: int = 16,
                   pre: bool = False) -> None:
    """Run `model` over `images` in batches with `hooks[name]` on each named layer, then remove them.

    Forward hooks get (module, args, output); with `pre`, forward pre-hooks get (module, args).
    """
    register = "register_forward_pre_hook" if pre else "register_forward_hook"
    handles = [getattr(model.get_submodule(n), register)(fn) for n, fn in hooks.items()]
    try:
        for i in range(0, len(images), batch):
            model(images[i:i + batch])
    finally:
        for h in handles:
            h.remove()
