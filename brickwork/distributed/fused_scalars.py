"""The step's scalars ride in DDP's last gradient bucket: one all-reduce per step, not two.

A data-parallel step must reduce, besides the gradients, a few scalars: the loss, the auxiliary
losses and a "this rank's loss is non-finite" flag, so every rank reports the whole batch's loss
and every rank skips the step or none does. Reduced on their own, they cost a second collective
per step: on gloo over loopback one round trip is ~0.5-0.7 ms whatever the size (``bench
distributed --breakdown``'s floor), as long as a tenth of a small model's whole step.

:class:`ScalarRider` is a DDP communication hook (``DistributedDataParallel.register_comm_hook``,
PyTorch's supported way to change what a bucket's collective does): every bucket is averaged as
DDP's default does (divided by the world size, then summed), and the bucket DDP reduces last in
the backward (``GradBucket.is_last()``) carries the scalars appended behind the gradients, summed
and not divided. The values are known before the backward (the loss is read before it, as the
skip decision needs), so they are handed to the rider then (:meth:`ScalarRider.start`) and read
after it. Exactness is kept: the scalars are summed in the bucket's dtype, float64 for a float64
model (the exactness tests' 1e-10 hold), float32 for a float32 one, whose losses are float32
values already; a bucket of a narrower dtype (bf16, fp16) would round them, so they then travel
in their own float64 all-reduce (issued by the hook, so the order of collectives is the same on
every rank). If a backward ran no bucket at all (nothing DDP reduces needed a gradient), the
values are all-reduced alone after it, which every rank then does alike.
"""

# No ``from __future__ import annotations``: DDP's register_comm_hook checks the hook's annotations
# against the real classes (``dist.GradBucket``), so they must not be strings.
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

#: Bucket dtypes wide enough to carry the step's scalars without rounding them further.
_WIDE = (torch.float32, torch.float64)


class ScalarRider:
    """DDP comm hook state: averages every bucket and sums the pending scalars with the last one.

    Args:
        group: the process group DDP reduces over.
        world_size: its size (the buckets' divisor).
    """

    def __init__(self, group: dist.ProcessGroup | None, world_size: int) -> None:
        self.group, self.world_size = group, world_size
        self._pending: Tensor | None = None  # (k,) float64 values waiting for the last bucket
        self._summed: Tensor | None = None  # (k,) their sums once the last bucket is reduced

    def start(self, values: Sequence[float]) -> Callable[[], list[float]]:
        """Hand ``values`` to the next backward's last bucket; the returned function (called after
        the backward) gives their sums over all ranks."""
        self._pending, self._summed = torch.tensor(list(values), dtype=torch.float64), None

        def wait() -> list[float]:
            if self._pending is not None:  # no bucket ran: reduce them alone (every rank alike)
                t, self._pending = self._pending, None
                dist.all_reduce(t, group=self.group)
                return t.tolist()
            assert self._summed is not None
            summed, self._summed = self._summed, None
            return summed.tolist()

        return wait

    def hook(self, state: object, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        """The hook (``register_comm_hook(None, rider.hook)``): ``bucket``'s averaged gradients."""
        grads = bucket.buffer()  # (n,) flat gradients of this bucket, in the model's dtype
        extra = self._pending if bucket.is_last() else None
        if extra is not None and grads.dtype not in _WIDE:
            dist.all_reduce(extra, group=self.group)  # too narrow to carry them: their own float64 sum
            self._pending, self._summed, extra = None, extra, None
        if extra is None:
            grads.div_(self.world_size)
            fut = dist.all_reduce(grads, group=self.group, async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])
        n = grads.numel()
        flat = torch.cat([grads / self.world_size, extra.to(grads.dtype)])  # (n + k,)
        self._pending = None

        def split(f: torch.futures.Future[list[Tensor]]) -> Tensor:
            out = f.value()[0]
            self._summed = out[n:].to(torch.float64)
            return out[:n]

        return dist.all_reduce(flat, group=self.group, async_op=True).get_future().then(split)
