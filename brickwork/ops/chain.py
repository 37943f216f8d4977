"""Skip or loop layers of a trained stack, search the chain of layers, score layer importance.

* :class:`ChainModel` runs any chain of a stack model's body layers (skip, repeat, reorder),
  sharing the model's modules (no copy).
* :func:`beam_search_chain` finds, for a data set, the cheapest chain whose accuracy stays at a
  required level; :func:`per_sample_oracle` finds the cheapest chain per sample. Both search
  order-preserving chains where a layer may be skipped or looped (repeated), the action space
  of chain-of-layers test-time depth adaptation (Li et al., 2025, "Skip a Layer or Loop it?",
  who search it per sample with Monte Carlo tree search; we use beam search or Monte Carlo tree
  search (:func:`mcts_chain`, :func:`mcts_cheapest_chain`; simplified: one search for the data
  set, a reward of accuracy and cost, a budget of chain evaluations) for the data set and, per
  sample, an exhaustive search over a bounded chain space evaluated in batches).
* :func:`layer_importance` scores each layer (or only its attention sublayer) by
  ``1 - cos(input, output)`` of the hidden states (He et al., 2024, "What Matters in
  Transformers? Not All Attention Is Needed"): a layer that barely changes its input can be
  dropped; :func:`drop_layers` and :func:`drop_attention` return the pruned copies.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brickwork.nn.modes import evaluating
from brickwork.nn.stack import Stack, StackModel

Chain = tuple[int, ...]


class ChainModel(nn.Module):
    """``head(body(stem(x), chain))``: a stack model run along ``chain`` (shares its modules).

    Shapes:
        as the model.
    """

    def __init__(self, model: StackModel, chain: Sequence[int]) -> None:
        super().__init__()
        self.model, self.chain = model, tuple(chain)

    def forward(self, x: Tensor) -> Tensor:
        m = self.model
        return m.head(m.body(m.stem(x), chain=self.chain))


def chain_cost(chain: Sequence[int], costs: Sequence[float]) -> float:
    """Cost of the body along ``chain`` given per-layer ``costs`` (e.g. FLOPs per sample)."""
    return float(sum(costs[i] for i in chain))


@torch.no_grad()
def chain_correct(model: StackModel, chain: Sequence[int], x: Tensor, y: Tensor, batch_size: int = 512) -> Tensor:
    """Per-sample accuracy of ``model`` along ``chain``, (N,) floats (per-token mean for (N, T) targets)."""
    out = []
    with evaluating(model):
        for s in range(0, len(x), batch_size):
            h = model.body(model.stem(x[s : s + batch_size]), chain=chain)
            pred = model.head(h).argmax(-1)
            hit = (pred == y[s : s + batch_size]).float()
            out.append(hit.reshape(hit.shape[0], -1).mean(1))
    return torch.cat(out)


@dataclass(frozen=True)
class ChainResult:
    """A chain with its accuracy on the search data and its cost."""

    chain: Chain
    accuracy: float
    cost: float


def _neighbours(chain: Chain, num_layers: int, max_repeat: int, max_len: int) -> list[Chain]:
    """Chains one edit away: skip one position, or loop one layer once more (next to itself)."""
    out = [chain[:k] + chain[k + 1 :] for k in range(len(chain))]
    if len(chain) < max_len:
        out += [
            chain[: k + 1] + (chain[k],) + chain[k + 1 :]
            for k in range(len(chain))
            if chain.count(chain[k]) < max_repeat
        ]
    return list(dict.fromkeys(c for c in out if c != chain))


def beam_search_chain(
    model: StackModel,
    x: Tensor,
    y: Tensor,
    *,
    min_accuracy: float,
    costs: Sequence[float] | None = None,
    beam: int = 4,
    steps: int | None = None,
    max_repeat: int = 2,
    max_len: int | None = None,
    batch_size: int = 512,
) -> tuple[ChainResult, list[ChainResult]]:
    """The cheapest chain with accuracy >= ``min_accuracy`` on ``(x, y)``, by beam search.

    Starting from the full chain, each step expands every chain of the beam by one edit (skip a
    position, or repeat a layer up to ``max_repeat`` times) and keeps the ``beam`` best: chains
    that meet the accuracy first, cheapest first; if too few meet it, the most accurate others
    (a loop can bring back what a skip lost).

    Args:
        costs: per-layer cost (default 1 per layer: chain length).
        steps: expansion steps (default: the number of layers).
        max_len: longest chain (default: number of layers + 2).

    Returns:
        The best chain found (the full chain if nothing cheaper meets the accuracy) and every
        chain evaluated, for accuracy-against-cost curves.
    """
    n = len(model.body)
    costs = [1.0] * n if costs is None else list(costs)
    max_len = n + 2 if max_len is None else max_len
    seen: dict[Chain, ChainResult] = {}

    def score(c: Chain) -> ChainResult:
        if c not in seen:
            seen[c] = ChainResult(c, float(chain_correct(model, c, x, y, batch_size).mean()), chain_cost(c, costs))
        return seen[c]

    full = score(tuple(range(n)))
    best = full
    frontier = [full]
    for _ in range(n if steps is None else steps):
        cands = {c: score(c) for r in frontier for c in _neighbours(r.chain, n, max_repeat, max_len)}
        if not cands:
            break
        ok = sorted((r for r in cands.values() if r.accuracy >= min_accuracy), key=lambda r: (r.cost, -r.accuracy))
        rest = sorted((r for r in cands.values() if r.accuracy < min_accuracy), key=lambda r: (-r.accuracy, r.cost))
        frontier = (ok + rest)[:beam]
        if ok and (ok[0].cost, -ok[0].accuracy) < (best.cost, -best.accuracy):
            best = ok[0]
    return best, list(seen.values())


def enumerate_chains(num_layers: int, max_repeat: int = 2) -> list[Chain]:
    """Every order-preserving chain in which each layer appears 0..``max_repeat`` times (not empty)."""
    chains = []
    for reps in itertools.product(range(max_repeat + 1), repeat=num_layers):
        chain = tuple(i for i, r in enumerate(reps) for _ in range(r))
        if chain:
            chains.append(chain)
    return chains


@dataclass
class OracleResult:
    """Per-sample chains (chain-of-layers' oracle analysis), two ways.

    Attributes:
        cheapest: per sample, the cheapest candidate at least as accurate on it as the full chain
            (the full chain if none is cheaper).
        relative_cost: (N,) cost of ``cheapest`` / cost of the full chain.
        best: per sample, the most accurate candidate on it (the cheapest among equals; the full
            chain competes).
        full_correct: (N,) per-sample accuracy of the full chain (per-token mean for sequences).
        oracle_correct: (N,) per-sample accuracy along ``best``.
    """

    cheapest: list[Chain]
    relative_cost: Tensor
    best: list[Chain]
    full_correct: Tensor
    oracle_correct: Tensor


@torch.no_grad()
def per_sample_oracle(
    model: StackModel,
    x: Tensor,
    y: Tensor,
    candidates: Iterable[Sequence[int]],
    costs: Sequence[float] | None = None,
    batch_size: int = 512,
) -> OracleResult:
    """For each sample, the cheapest candidate chain no worse than the full one, and the most
    accurate candidate chain.

    Every candidate runs on all samples in batches (exhaustive over ``candidates``, e.g.
    :func:`enumerate_chains`): for small stacks this is exact where a per-sample tree search is
    approximate. It answers Li et al.'s (2025) two questions: how much depth a sample needs, and
    whether some chain corrects what the full chain gets wrong.
    """
    n = len(model.body)
    costs = [1.0] * n if costs is None else list(costs)
    full = tuple(range(n))
    full_cost = chain_cost(full, costs)
    full_hit = chain_correct(model, full, x, y, batch_size)
    low_cost, low_chain = torch.full_like(full_hit, full_cost), [full] * len(x)
    top_cost, top_hit, top_chain = low_cost.clone(), full_hit.clone(), [full] * len(x)
    for cand in dict.fromkeys(tuple(c) for c in candidates):
        c_cost = torch.full_like(full_hit, chain_cost(cand, costs))
        hit = chain_correct(model, cand, x, y, batch_size)
        cheaper = (hit >= full_hit) & (c_cost < low_cost)
        better = (hit > top_hit) | ((hit == top_hit) & (c_cost < top_cost))
        for i in cheaper.nonzero().flatten().tolist():
            low_chain[i] = cand
        for i in better.nonzero().flatten().tolist():
            top_chain[i] = cand
        low_cost = torch.where(cheaper, c_cost, low_cost)
        top_cost, top_hit = torch.where(better, c_cost, top_cost), torch.where(better, hit, top_hit)
    return OracleResult(low_chain, low_cost / full_cost, top_chain, full_hit, top_hit)


# -- layer importance and dropping ------------------------------------------------------------------

Part = Literal["block", "attention"]


def _dissimilarity(a: Tensor, b: Tensor) -> tuple[float, int]:
    """Sum over feature vectors (channels of (B, C, H, W), the last dim otherwise) of
    ``1 - cos(a, b)``, and how many vectors there were."""
    if a.dim() == 4:
        a, b = a.movedim(1, -1), b.movedim(1, -1)
    cos = F.cosine_similarity(a.flatten(0, -2).double(), b.flatten(0, -2).double(), dim=-1)
    return float((1 - cos).sum()), cos.numel()


class AttentionBlock(Protocol):
    """A block whose attention sublayer can be scored and dropped on its own."""

    def after_attention(self, h: Tensor) -> Tensor: ...

    def drop_attention_(self) -> None: ...


def has_attention(layer: nn.Module) -> TypeGuard[AttentionBlock]:
    """Whether ``layer`` has an attention sublayer that can be scored and dropped on its own
    (``after_attention`` / ``drop_attention_``: pre-norm and post-norm transformer blocks)."""
    return callable(getattr(layer, "after_attention", None)) and callable(getattr(layer, "drop_attention_", None))


@torch.no_grad()
def layer_importance(model: StackModel, batches: Iterable[Tensor], part: Part = "block") -> list[float]:
    """``1 - mean cos(h_in, h_out)`` per body layer, over every feature vector of ``batches``
    (token, pixel or sample: batches of different sizes weigh by their vectors).

    For ``part="attention"`` the output is the hidden state after the attention sublayer only
    (the block's ``after_attention``: ``h + attn(norm1(h))`` pre-norm, ``norm1(h + attn(h))``
    post-norm). Layers whose output has another shape than their input (a stride or a channel
    change), or without attention, score NaN: they cannot be dropped. Sequence batches must be
    free of padding (:func:`brickwork.data.sentences.token_batches`), or padded positions count.
    """
    n = len(model.body)
    sums, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    with evaluating(model):
        for x in batches:
            h = model.stem(x)
            for i, layer in enumerate(model.body.layers):
                nxt = layer(h)
                if part == "attention":
                    out = layer.after_attention(h) if has_attention(layer) else None
                else:
                    out = nxt
                if out is None or out.shape != h.shape:
                    sums[i] = float("nan")
                else:
                    total, vectors = _dissimilarity(h, out)
                    sums[i] += total
                    count[i] += vectors
                h = nxt
    return (sums / count.clamp_min(1)).tolist()


def least_important(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` lowest finite scores (the layers to drop first)."""
    finite = [i for i, s in enumerate(scores) if s == s]
    return sorted(sorted(finite, key=lambda i: scores[i])[:k])


def drop_layers(model: StackModel, drop: Iterable[int]) -> StackModel:
    """A copy of ``model`` without the body layers ``drop`` (Block Drop).

    The model is copied in one piece, so bricks shared between its parts (a padding mask the
    stem writes and the attention layers read) stay shared in the copy.
    """
    out = copy.deepcopy(model)
    gone = {i % len(out.body) for i in drop}
    out.body = Stack([layer for i, layer in enumerate(out.body.layers) if i not in gone])
    return out


def drop_attention(model: StackModel, drop: Iterable[int]) -> StackModel:
    """A copy of ``model`` whose blocks ``drop`` keep their FFN but lose attention (Attention Drop;
    each block knows what its sublayer is: ``drop_attention_``)."""
    out = drop_layers(model, [])
    for i in drop:
        layer = out.body.layers[i]
        if has_attention(layer):
            layer.drop_attention_()
        else:
            raise ValueError(f"drop_attention: layer {i} ({type(layer).__name__}) has no attention sublayer")
    return out


def mcts_search(
    root: Chain,
    neighbours: Callable[[Chain], list[Chain]],
    reward: Callable[[Chain], float],
    *,
    simulations: int = 200,
    exploration: float = 1.0,
    seed: int = 0,
    evaluations: int | None = None,
) -> tuple[Chain, dict[Chain, float]]:
    """Monte Carlo tree search over chains: UCB1 selection, one expansion and one evaluation per simulation.

    Each simulation walks down from ``root`` by UCB1 (``mean + c sqrt(ln N_parent / N_child)``)
    while the node is fully expanded, expands one untried edit of the node it stops at (chosen at
    random), scores it with ``reward`` and backs the score up the path (mean value). The budget
    is the number of simulations, or with ``evaluations`` the number of distinct chains scored
    (the root included), the unit beam search is measured in: the search then stops when that
    many have been scored (``simulations`` still bounds the walks, for a space smaller than the
    budget). Deterministic for a given ``seed``.

    Args:
        root: the starting chain.
        neighbours: the chains one edit away from a chain.
        reward: the score to maximise (higher is better).
        simulations: the budget (the most walks, with ``evaluations``).
        exploration: the UCB constant c.
        seed: order of trying untried edits.
        evaluations: stop once this many distinct chains have been scored.

    Returns:
        The best-rewarded chain evaluated, and every evaluated chain's reward.
    """
    rng = random.Random(seed)
    scores: dict[Chain, float] = {root: reward(root)}
    visits: dict[Chain, int] = {root: 1}
    value: dict[Chain, float] = {root: scores[root]}
    children: dict[Chain, list[Chain]] = {}
    untried: dict[Chain, list[Chain]] = {}
    for _ in range(simulations):
        if evaluations is not None and len(scores) >= evaluations:
            break
        node, path = root, [root]
        while True:
            if node not in untried:
                options = [c for c in neighbours(node) if c not in path]
                rng.shuffle(options)
                untried[node], children[node] = options, []
            # edits can undo each other (skip then loop): never walk back onto the path
            options = [c for c in children[node] if c not in path]
            if untried[node] or not options:
                break
            parent = visits[node]
            node = max(
                options, key=lambda c: value[c] / visits[c] + exploration * math.sqrt(math.log(parent) / visits[c])
            )
            path.append(node)
        untried[node] = [c for c in untried[node] if c not in path]
        if not untried[node]:  # a leaf with no edits left: re-score it
            r = scores[node]
        else:
            child = untried[node].pop()
            children[node].append(child)
            if child not in scores:
                scores[child] = reward(child)
            visits.setdefault(child, 0)
            value.setdefault(child, 0.0)
            path.append(child)
            r = scores[child]
        for c in path:
            visits[c] = visits.get(c, 0) + 1
            value[c] = value.get(c, 0.0) + r
    best = max(scores, key=lambda c: (scores[c], -len(c)))
    return best, scores


def _evaluator(
    model: StackModel, x: Tensor, y: Tensor, costs: Sequence[float], batch_size: int
) -> tuple[dict[Chain, ChainResult], Callable[[Chain], ChainResult]]:
    """A memo of evaluated chains and the function that fills it (each chain is run once)."""
    seen: dict[Chain, ChainResult] = {}

    def evaluate(c: Chain) -> ChainResult:
        if c not in seen:
            seen[c] = ChainResult(c, float(chain_correct(model, c, x, y, batch_size).mean()), chain_cost(c, costs))
        return seen[c]

    return seen, evaluate


def mcts_chain(
    model: StackModel,
    x: Tensor,
    y: Tensor,
    *,
    costs: Sequence[float] | None = None,
    cost_weight: float = 0.5,
    simulations: int = 200,
    exploration: float = 1.0,
    max_repeat: int = 2,
    max_len: int | None = None,
    batch_size: int = 512,
    seed: int = 0,
) -> tuple[ChainResult, list[ChainResult]]:
    """A chain for the data set ``(x, y)`` by Monte Carlo tree search (:func:`mcts_search`).

    The action space is :func:`beam_search_chain`'s (skip a position, or loop a layer next to
    itself, up to ``max_repeat`` times), searched from the full chain. The reward is
    ``accuracy - cost_weight * cost / full cost``. Simplified against Li et al. (2025), who run
    MCTS per sample on an LLM's answer; here one search serves the whole data set, the reward is
    this accuracy-minus-cost trade-off and the budget is ``simulations`` chain evaluations.

    Returns:
        The best chain by reward and every chain evaluated (for accuracy-against-cost curves).
    """
    n = len(model.body)
    costs = [1.0] * n if costs is None else list(costs)
    max_len = n + 2 if max_len is None else max_len
    full_cost = chain_cost(tuple(range(n)), costs)
    seen, evaluate = _evaluator(model, x, y, costs, batch_size)

    def reward(c: Chain) -> float:
        r = evaluate(c)
        return r.accuracy - cost_weight * r.cost / full_cost

    best, _ = mcts_search(
        tuple(range(n)),
        lambda c: _neighbours(c, n, max_repeat, max_len),
        reward,
        simulations=simulations,
        exploration=exploration,
        seed=seed,
    )
    return seen[best], list(seen.values())


def mcts_cheapest_chain(
    model: StackModel,
    x: Tensor,
    y: Tensor,
    *,
    min_accuracy: float,
    evaluations: int,
    costs: Sequence[float] | None = None,
    exploration: float = 1.0,
    max_repeat: int = 2,
    max_len: int | None = None,
    batch_size: int = 512,
    seed: int = 0,
) -> tuple[ChainResult, list[ChainResult]]:
    """:func:`beam_search_chain`'s problem (the cheapest chain with accuracy >= ``min_accuracy``)
    solved by Monte Carlo tree search (:func:`mcts_search`) within ``evaluations`` chains scored.

    Same action space and start (the full chain). Reward: ``1 - cost / full cost`` for a chain
    that meets the accuracy (cheaper is better), and below every such value for one that does
    not, ``-(R + required - accuracy)`` with R the largest cost ratio a chain can have (closer to
    the requirement is better, so the search is drawn towards the feasible region). Simplified
    against Li et al. (2025), who search each sample's chain on an LLM's answer: here one search
    serves the data set, with this reward, and the budget counts chain evaluations.

    Returns:
        The cheapest evaluated chain meeting the accuracy (the full chain if none is cheaper) and
        every chain evaluated, as :func:`beam_search_chain` returns them.
    """
    n = len(model.body)
    costs = [1.0] * n if costs is None else list(costs)
    max_len = n + 2 if max_len is None else max_len
    full_cost = chain_cost(tuple(range(n)), costs)
    worst = max_len * max(costs) / full_cost
    seen, evaluate = _evaluator(model, x, y, costs, batch_size)

    def reward(c: Chain) -> float:
        r = evaluate(c)
        if r.accuracy >= min_accuracy:
            return 1.0 - r.cost / full_cost
        return -(worst + min_accuracy - r.accuracy)

    mcts_search(
        tuple(range(n)),
        lambda c: _neighbours(c, n, max_repeat, max_len),
        reward,
        simulations=100 * evaluations,
        exploration=exploration,
        seed=seed,
        evaluations=evaluations,
    )
    full = seen[tuple(range(n))]
    ok = [r for r in seen.values() if r.accuracy >= min_accuracy]
    best = min(ok, key=lambda r: (r.cost, -r.accuracy)) if ok else full
    if (best.cost, -best.accuracy) >= (full.cost, -full.accuracy):
        best = full
    return best, list(seen.values())
