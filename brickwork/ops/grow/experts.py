"""More experts in an MoE layer, starting with no change to its output.

Two ways to add experts to a top-k routed :class:`~brickwork.nn.moe.MoE` (a
:class:`~brickwork.nn.routing.TopKRouter` over a :class:`~brickwork.nn.routing.GroupedFFNExperts`
bank):

* ``unchosen``: new experts (fresh weights at the old experts' scale) whose router rows have
  zero weights and a bias of ``logit`` (default -30), so they rank below every old expert for
  any input whose old logits exceed it, and their softmax mass (below e^-30 of an old expert's)
  leaves the combine weights unchanged to 1e-10 even without renormalisation. The scorer gets
  a bias if it had none (zero for the old experts). Exact while no old logit of a token falls
  to ``logit``; tested, and checked by :func:`chosen_new`.
* ``copy``: every expert is copied ``c - 1`` more times and ``top_k`` is multiplied by c. The
  copies have the router rows of their original, so a softmax puts ``p_i / c`` on each copy
  (the probability mass is split), the top ``c k`` are exactly the copies of the old top k,
  and the combined output is unchanged; a renormalised sigmoid gate is unchanged as well.
  Exact for any input (up to ties at the top-k boundary, which the old router had too).

:func:`split_expert` splits one expert into two copies whose router rows each carry half of
the expert's probability (a bias of ``-log 2``); with dense routing (``top_k = E``, kept
dense: ``top_k`` becomes E + 1) this is exact. With sparse top-k the two halves rank lower
than the expert did and can change which experts are chosen: there it is a growth step, not
an identity (stated, and measured in the tests).

Each function returns a **copy** (``in_place=True`` edits the model given).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from brickwork.errors import BrickworkError
from brickwork.nn.moe import MoE
from brickwork.nn.routing import GroupedFFNExperts, TopKRouter
from brickwork.nn.stack import StackModel
from brickwork.ops.grow.edit import resize
from brickwork.ops.grow.units import fresh_tail, take, tiled_map
from brickwork.ops.grow.width import stack_model, sublayers

ExpertMode = Literal["unchosen", "copy"]


def _moe_layers(model: StackModel, layers: Sequence[int] | None, op: str) -> dict[int, MoE]:
    out = {}
    for i, moe in sublayers(model, layers, "ffn", MoE, "a mixture of experts", op).items():
        assert isinstance(moe, MoE)
        where = f"body.layers.{i}.ffn"
        if not isinstance(moe.router, TopKRouter) or not isinstance(moe.experts, GroupedFFNExperts):
            raise BrickworkError(
                f"{op}: {where} needs a top-k router over grouped FFN experts, "
                f"got {type(moe.router).__name__} over {type(moe.experts).__name__}"
            )
        out[i] = moe
    return out


def _biased_proj(router: TopKRouter) -> nn.Linear:
    """The router's scorer with a bias (a zero one added if it had none)."""
    proj = router.proj
    if proj.bias is not None:
        return proj
    new = nn.Linear(proj.in_features, proj.out_features, bias=True, device=proj.weight.device, dtype=proj.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(proj.weight)
        new.bias.zero_()
    router.proj = new
    return new


@torch.no_grad()
def _grow_bank(bank: GroupedFFNExperts, g: Tensor, fresh: bool, gen: torch.Generator) -> None:
    """Experts re-indexed by the map ``g`` (copies), or with fresh new experts (``fresh``)."""
    old = bank.num_experts
    tensors = {}
    for name in ("w_in", "w_out", "b_in", "b_out"):
        t = getattr(bank, name)
        if t is not None:
            grown = take(t, g, 0)
            tensors[name] = fresh_tail(grown, old, 0, gen) if fresh else grown
    resize(bank, tensors, num_experts=len(g))


@torch.no_grad()
def _grow_router(router: TopKRouter, g: Tensor, bias_tail: float | None, shift: Tensor | None = None) -> None:
    """Router rows re-indexed by ``g``; new rows zero with bias ``bias_tail`` (when given)."""
    old = router.num_experts
    proj = _biased_proj(router) if bias_tail is not None or shift is not None else router.proj
    w, b = take(proj.weight, g, 0), None if proj.bias is None else take(proj.bias, g, 0)
    if bias_tail is not None and b is not None:
        w[old:] = 0.0
        b[old:] = bias_tail
    if shift is not None and b is not None:
        b += shift.to(b.dtype)
    resize(proj, {"weight": w} | ({"bias": b} if b is not None else {}), out_features=len(g))
    if router.noise_proj is not None:
        nw = take(router.noise_proj.weight, g, 0)
        if bias_tail is not None:
            nw[old:] = 0.0
        resize(router.noise_proj, {"weight": nw}, out_features=len(g))
    sel = router.selection_bias
    if sel is not None:
        resize(sel, {"bias": take(sel.bias, g, 0), "pending_load": take(sel.pending_load, g, 0)})
    router.num_experts = len(g)


def _set_experts(moe: MoE, n: int) -> None:
    moe.num_experts = n


def add_experts(
    model: nn.Module,
    count: int,
    layers: Sequence[int] | None = None,
    mode: ExpertMode = "unchosen",
    logit: float = -30.0,
    seed: int = 0,
    in_place: bool = False,
) -> StackModel:
    """A copy of ``model`` whose chosen MoE layers have ``count`` more experts.

    Args:
        model: a stack model whose chosen body layers' ``ffn`` is a top-k MoE of grouped FFN experts.
        count: experts to add per layer (``copy``: a multiple of E, every expert copied equally).
        layers: body layer indices (default all).
        mode: ``unchosen`` or ``copy`` (see the module docstring).
        logit: the router bias of new ``unchosen`` experts.
        seed: the new experts' weights.
        in_place: edit ``model`` itself.

    Raises:
        BrickworkError: ``count`` < 1, a ``copy`` count that is not a multiple of E, a sigmoid
            gate without renormalisation (its weights cannot be split), or a layer that is not
            a top-k MoE.
    """
    out = stack_model(model, "add_experts")
    if count < 1:
        raise BrickworkError(f"add_experts: count must be >= 1 (experts to add), got {count}")
    _moe_layers(out, layers, "add_experts")
    if not in_place:
        out = copy.deepcopy(out)
    gen = torch.Generator().manual_seed(seed)
    for i, moe in _moe_layers(out, layers, "add_experts").items():
        e = moe.num_experts
        router = moe.router
        assert isinstance(router, TopKRouter) and isinstance(moe.experts, GroupedFFNExperts)
        if mode == "copy":
            if count % e:
                raise BrickworkError(
                    f"add_experts: body.layers.{i}.ffn has {e} experts; copying needs a multiple of {e}, got {count}"
                )
            if router.gate == "sigmoid_topk":
                raise BrickworkError(
                    f"add_experts: body.layers.{i}.ffn has an unnormalised sigmoid gate; copies cannot split it"
                )
            g = tiled_map(e, 1 + count // e)
            _grow_bank(moe.experts, g, False, gen)
            _grow_router(router, g, None)
            router.top_k *= 1 + count // e
        else:
            g = torch.cat([torch.arange(e), torch.arange(count) % e])
            _grow_bank(moe.experts, g, True, gen)
            _grow_router(router, g, logit)
        _set_experts(moe, len(g))
    return out


def split_expert(model: nn.Module, layer: int, expert: int, in_place: bool = False) -> StackModel:
    """A copy of ``model`` in which expert ``expert`` of body layer ``layer``'s MoE is two copies,
    each routed with half its probability (exact with dense routing; see the module docstring).

    Raises:
        BrickworkError: the layer is not a top-k MoE, or ``expert`` is out of range.
    """
    out = stack_model(model, "split_expert")
    moe = _moe_layers(out, [layer], "split_expert")
    e = next(iter(moe.values())).num_experts
    if not -e <= expert < e:
        raise BrickworkError(
            f"split_expert: expert {expert} is out of range; body.layers.{layer}.ffn has {e} experts (0 .. {e - 1})"
        )
    if not in_place:
        out = copy.deepcopy(out)
    moe_layer = next(iter(_moe_layers(out, [layer], "split_expert").values()))
    router = moe_layer.router
    assert isinstance(router, TopKRouter) and isinstance(moe_layer.experts, GroupedFFNExperts)
    if router.gate.startswith("sigmoid"):
        raise BrickworkError("split_expert: a sigmoid gate gives each copy its own full affinity; use a softmax gate")
    k = expert % e
    g = torch.cat([torch.arange(e), torch.tensor([k])])
    shift = torch.zeros(e + 1, dtype=torch.float64)
    shift[[k, e]] = -math.log(2.0)  # each copy carries half the expert's softmax mass
    dense = router.top_k == e
    _grow_bank(moe_layer.experts, g, False, torch.Generator())
    _grow_router(router, g, None, shift)
    if dense:
        router.top_k = e + 1
    _set_experts(moe_layer, e + 1)
    return out


@torch.no_grad()
def chosen_new(model: nn.Module, old: dict[str, int]) -> int:
    """Assignments of the last forward that went to experts numbered at or above ``old[path]``
    (the experts an ``unchosen`` growth added), summed over the MoE layers named in ``old``."""
    total = 0
    for path, m in model.named_modules():
        if path in old and isinstance(m, MoE) and m.record is not None:
            total += int((m.record.expert_idx >= old[path]).sum())
    return total
