"""Forward hooks on named layers that are always removed, and running a model over images with them."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from spiq.core.devices import module_device


@contextmanager
def forward_hooks(model: nn.Module, hooks: dict[str, Callable], pre: bool = False) -> Iterator[None]:
    """`hooks[name]` on each named submodule of `model` inside the block, removed however it ends.

    Forward hooks get (module, args, output); with `pre`, forward pre-hooks get (module, args).
    """
    register = "register_forward_pre_hook" if pre else "register_forward_hook"
    handles = []
    try:
        for name, fn in hooks.items():
            handles.append(getattr(model.get_submodule(name), register)(fn))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_with_hooks(model: nn.Module, hooks: dict[str, Callable], images: torch.Tensor, batch: int = 16,
                   pre: bool = False) -> None:
    """Run `model` over `images` in batches with `hooks[name]` on each named layer (see forward_hooks),
    each batch moved to the model's device: the hooks see tensors where the model is."""
    device = module_device(model)
    with forward_hooks(model, hooks, pre):
        for i in range(0, len(images), batch):
            model(images[i:i + batch].to(device))
