"""The heap kept between passes: a repeated forward pass must not fault its memory in again."""
import resource

import torch

from spiq.core.memory import keep_freed_memory


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@torch.no_grad()
def test_repeated_pass_reuses_memory(lite0, sample):
    assert keep_freed_memory()   # glibc here; conftest made the same call at start
    x = sample[0][:25]
    lite0(x)   # the first pass grows the heap
    before = _minor_faults()
    for _ in range(3):
        lite0(x)
    # Without the kept heap each pass maps its large activations afresh: ~4·10^5 page faults per
    # pass here. With it, the heap settles after a pass or two (~3·10^4 faults in all).
    assert _minor_faults() - before < 100_000
