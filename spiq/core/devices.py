"""Where evaluation runs: `auto`, `cpu` or `cuda[:N]` resolved to a torch device, refused before any
work when it is not there, a model put on it without touching the caller's copy; and how many
images go through at a time unless told."""
from __future__ import annotations

import copy

import torch
from torch import nn

from spiq.config import ConfigError

DEVICES = ("auto", "cpu", "cuda")
# Images per forward pass unless told: the batches the accuracy benchmarks were run with.
BATCH_SIZE = 25


class DeviceError(ConfigError):
    """A device that is not on this machine, or not a device name at all."""


def resolve_device(name: str | torch.device | None = "cpu", what: str = "device") -> torch.device:
    """`name` as a torch device: auto is the first GPU when torch sees one, else the CPU.

    `what` names the setting in the message (the CLI passes "--device")."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "cpu").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"{what} {name!r} is not a device: give {', '.join(DEVICES)} or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"{what} {name}: only {', '.join(DEVICES)} are supported")
    if not torch.cuda.is_available():
        raise DeviceError(f"{what} {name}: no CUDA device here (torch.cuda.is_available() is False); "
                          f"use {what} cpu or {what} auto")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"{what} {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    # indexed, so that a model's device and the one asked for compare equal
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def module_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (CPU for a model with neither)."""
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` itself when it is on `device` already, else a copy there: the caller's model (a cached
    float model the next quantize() reads on the CPU) stays where it was."""
    if module_device(model) == device:
        return model
    return copy.deepcopy(model).to(device)
