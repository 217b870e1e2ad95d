"""How far a quantized tensor is from its float reference (SQNR), and proof that a model was not changed."""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """20·log10(‖y‖/‖y − ŷ‖) from the two squared norms."""
    if noise_energy <= 0:
        return math.inf
    if signal_energy <= 0:
        return -math.inf
    return 10.0 * math.log10(signal_energy / noise_energy)


def tensor_sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """sqnr_db of `test` against `reference` (the signal), in float64, on the reference's device."""
    ref = reference.double()
    return sqnr_db(float((ref ** 2).sum()), float(((test.to(ref) - ref) ** 2).sum()))


def mean_logit_sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Per image 20·log10(‖y‖/‖y − ŷ‖), averaged over a batch of logits (N, classes): a steadier
    measure than agreement of top-1s."""
    test = test.to(reference.device)
    return (20 * torch.log10(reference.norm(dim=1) / (reference - test).norm(dim=1).clamp_min(1e-12))).mean().item()


def parameter_checksum(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer: proof that a shared model was never changed."""
    h = hashlib.sha256()
    for name, t in list(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
