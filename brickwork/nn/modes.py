"""Running modules in eval mode for a measurement, and putting their own modes back.

Every measurement pass (FLOPs, activations, exits, latency, routing statistics) and every
conversion that records activations runs the model in eval mode (dropout off, batch norm on its
running statistics, routers without noise) and must leave the caller's model as it found it,
also when the pass raises. One context manager does that for all of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every submodule's own ``training`` flag restored after it.

    Restored on error too.

    Restoring each submodule's own flag (not ``model.train(was)``, which sets every child to the
    parent's mode) keeps a part the caller froze in eval mode (a teacher, a frozen substrate, a
    batch norm on fixed statistics) frozen after the measurement.

    Autograd is left as it is: wrap in ``torch.no_grad()`` where the pass needs no gradients.

    Example:
        >>> with evaluating(model):
        ...     logits = model(x)
    """
    modes = [(sub, sub.training) for m in modules for sub in m.modules()]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for sub, was in modes:
            sub.training = was
