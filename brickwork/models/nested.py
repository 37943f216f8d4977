"""Model builders for dynamic depth and width: nested supernets and early-exit wrappers.

Nested builders (``nested_mlp``, ``nested_cnn``, ``nested_lm``, ``nested_vit``) build a
:class:`~brickwork.nn.nested.NestedModel` from nested bricks; at full width and depth each is
the plain model of the same shape. Slicing one at (width, depth) gives the model this builder
makes with smaller arguments (:func:`sliced_args`), which is how a sliced checkpoint is rebuilt.

``early_exit`` wraps any registered stack model with exit heads (:class:`~brickwork.nn.exits.EarlyExit`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field, TypeAdapter
from torch import nn

from brickwork.analysis.compute import stack_flops
from brickwork.models.presets import DATA_ARGS, preset
from brickwork.nn import (
    ClassifierHead,
    ConvBlock,
    DenseLayer,
    PatchEmbed,
    Stack,
    StackModel,
    TokenEmbed,
    TransformerBlock,
)
from brickwork.nn.exits import (
    GATED_OBJECTIVES,
    EarlyExit,
    ExitGate,
    ExitObjective,
    ExitPolicy,
    GateFeatures,
    Teacher,
)
from brickwork.nn.ffn import Activation
from brickwork.nn.nested import (
    NestedAttention,
    NestedModel,
    Sampling,
    nested_classifier_head,
    nested_conv_block,
    nested_dense_layer,
    nested_feed_forward,
    nested_flatten_embed,
    units,
)
from brickwork.registry import REGISTRY, register

Widths = Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)]
Depths = list[Annotated[int, Field(ge=1)]] | None
Dims = list[Annotated[int, Field(ge=1)]]
Samples = Annotated[int, Field(ge=1)]
DEFAULT_WIDTHS = (0.25, 0.5, 0.75, 1.0)


@register("model", "nested_mlp", injected=DATA_ARGS)
def nested_mlp(
    in_shape: tuple[int, ...],
    num_classes: int,
    width: Annotated[int, Field(ge=1)] = 256,
    depth: Annotated[int, Field(ge=1)] = 3,
    act: Activation = "gelu",
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    widths: Widths = list(DEFAULT_WIDTHS),  # noqa: B006 - read only
    depths: Depths = None,
    sampling: Sampling = "sandwich",
    samples: Samples = 3,
    matryoshka: Dims = [],  # noqa: B006 - read only
) -> NestedModel:
    """Nested MLP: the layout of ``mlp``, every hidden width nested, trained as SortedNet.

    Args:
        in_shape, num_classes: from the data.
        width, depth, act, dropout: as in ``mlp`` (full size).
        widths: width fractions of the trained sub-networks.
        depths: body depths of the trained sub-networks (default: the full depth only).
        sampling, samples: sub-networks per step (:class:`~brickwork.nn.nested.NestedModel`).
        matryoshka: nested representation sizes for the Matryoshka loss (empty: off).

    Shapes:
        (B, *in_shape) -> (B, K)
    """
    body = Stack([nested_dense_layer(width, width, act, dropout) for _ in range(depth)])
    model = StackModel(
        nested_flatten_embed(math.prod(in_shape), width), body, nested_classifier_head(width, num_classes)
    )
    return NestedModel(model, widths, depths, sampling, samples, matryoshka)


@register("model", "nested_cnn", injected=DATA_ARGS)
def nested_cnn(
    in_shape: tuple[int, int, int],
    num_classes: int,
    channels: tuple[int, ...] = (16, 32, 64),
    blocks: Annotated[int, Field(ge=1)] = 1,
    norm: str = "group",
    depth: Annotated[int, Field(ge=1)] | None = None,
    widths: Widths = list(DEFAULT_WIDTHS),  # noqa: B006
    depths: Depths = None,
    sampling: Sampling = "sandwich",
    samples: Samples = 3,
) -> NestedModel:
    """Nested CNN: the layout of ``cnn`` with nested channels (norm group or none).

    Args:
        channels, blocks: as in ``cnn``.
        norm: ``group`` (one-group GroupNorm, shared exactly by every width) or ``none``.
        depth: keep only the first ``depth`` body layers (a sliced model); default all.
        depths: trained depths; each must end on a layer with as many channels as the last.

    Shapes:
        (B, C, H, W) -> (B, K)
    """
    if len(in_shape) != 3:
        raise ValueError(f"nested_cnn: expects images (C, H, W), got input shape {tuple(in_shape)}")
    layers, out_ch, c = [], [], channels[0]
    for c_out in channels:
        for b in range(blocks):
            layers.append(nested_conv_block(c, c_out, stride=2 if b == 0 else 1, norm=norm))
            out_ch.append(c_out)
            c = c_out
    keep = len(layers) if depth is None else depth
    if not 1 <= keep <= len(layers):
        raise ValueError(f"nested_cnn: depth {depth} outside 1..{len(layers)}")
    valid = [d for d in range(1, keep + 1) if out_ch[d - 1] == out_ch[keep - 1]]
    if depths is not None and not set(depths) <= set(valid):
        raise ValueError(
            f"nested_cnn: depths {depths} must end where the channels equal the last layer's; valid here: {valid}"
        )
    stem = nested_conv_block(in_shape[0], channels[0], norm=norm, nest_in=False)
    model = StackModel(stem, Stack(layers[:keep]), nested_classifier_head(out_ch[keep - 1], num_classes, "spatial"))
    return NestedModel(model, widths, depths, sampling, samples)


def _nested_transformer(
    dim: int, depth: int, heads: int, head_dim: int | None, ffn_hidden: int | None, causal: bool, dropout: float
) -> Stack:
    hidden = 4 * dim if ffn_hidden is None else ffn_hidden
    return Stack(
        [
            TransformerBlock(
                dim,
                NestedAttention(dim, heads, head_dim, causal=causal),
                nested_feed_forward(dim, hidden, dropout=dropout),
                dropout=dropout,
            )
            for _ in range(depth)
        ]
    )


@register("model", "nested_lm", injected=DATA_ARGS)
def nested_lm(
    in_shape: tuple[int],
    num_classes: int,
    dim: Annotated[int, Field(ge=1)] = 64,
    depth: Annotated[int, Field(ge=1)] = 2,
    heads: Annotated[int, Field(ge=1)] = 4,
    head_dim: Annotated[int, Field(ge=1)] | None = None,
    ffn_hidden: Annotated[int, Field(ge=1)] | None = None,
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    widths: Widths = list(DEFAULT_WIDTHS),  # noqa: B006
    depths: Depths = None,
    sampling: Sampling = "sandwich",
    samples: Samples = 3,
) -> NestedModel:
    """Nested causal transformer LM: heads, FFN neurons and depth nested (Sorted LLaMA-style).

    Depth is nested through the shared final head (Sorted LLaMA, Kavehzadeh et al., 2024);
    the model width D is not nested.

    Args:
        dim: model width D; heads: H; head_dim: per head (default D / H);
        ffn_hidden: FFN width (default 4 D); others as in ``nested_mlp``.

    Shapes:
        (B, T) int64 -> (B, T, V)
    """
    return NestedModel(
        StackModel(
            TokenEmbed(num_classes, dim, in_shape[0]),
            _nested_transformer(dim, depth, heads, head_dim, ffn_hidden, True, dropout),
            ClassifierHead(dim, num_classes, pool="none", norm=True),
        ),
        widths,
        depths,
        sampling,
        samples,
    )


@register("model", "nested_vit", injected=DATA_ARGS)
def nested_vit(
    in_shape: tuple[int, int, int],
    num_classes: int,
    dim: Annotated[int, Field(ge=1)] = 64,
    depth: Annotated[int, Field(ge=1)] = 2,
    heads: Annotated[int, Field(ge=1)] = 4,
    head_dim: Annotated[int, Field(ge=1)] | None = None,
    ffn_hidden: Annotated[int, Field(ge=1)] | None = None,
    patch: Annotated[int, Field(ge=1)] = 4,
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    widths: Widths = list(DEFAULT_WIDTHS),  # noqa: B006
    depths: Depths = None,
    sampling: Sampling = "sandwich",
    samples: Samples = 3,
) -> NestedModel:
    """Nested vision transformer (heads and FFN neurons nested), mean-pooled tokens.

    Shapes:
        (B, C, H, W) -> (B, K)
    """
    return NestedModel(
        StackModel(
            PatchEmbed(in_shape, dim, patch),
            _nested_transformer(dim, depth, heads, head_dim, ffn_hidden, False, dropout),
            ClassifierHead(dim, num_classes, pool="tokens", norm=True),
        ),
        widths,
        depths,
        sampling,
        samples,
    )


preset(nested_mlp, "nested-mlp-small", "Nested MLP, 3 layers of 256 units, widths 1/4..1.", width=256, depth=3)
preset(nested_lm, "nested-lm-tiny", "Nested causal LM, width 64, 2 blocks, 4 nested heads.", dim=64, depth=2, heads=4)


# -- slicing: the builder arguments of a sub-network ------------------------------------------------


def _mlp_args(a: dict[str, Any], w: float, d: int) -> dict[str, Any]:
    return {**a, "width": units(w, a["width"]), "depth": d}


def _cnn_args(a: dict[str, Any], w: float, d: int) -> dict[str, Any]:
    return {**a, "channels": [units(w, c) for c in a["channels"]], "depth": d}


def _transformer_args(a: dict[str, Any], w: float, d: int) -> dict[str, Any]:
    head_dim = a.get("head_dim") or a["dim"] // a["heads"]
    hidden = a.get("ffn_hidden") or 4 * a["dim"]
    return {**a, "heads": units(w, a["heads"]), "head_dim": head_dim, "ffn_hidden": units(w, hidden), "depth": d}


_SLICERS: dict[Callable[..., Any], Callable[[dict[str, Any], float, int], dict[str, Any]]] = {
    nested_mlp: _mlp_args,
    nested_cnn: _cnn_args,
    nested_lm: _transformer_args,
    nested_vit: _transformer_args,
}


def sliced_args(name: str, args: dict[str, Any], width: float, depth: int) -> dict[str, Any]:
    """Arguments for model ``name`` (a nested builder or preset) that build the sub-network at
    ``width`` and ``depth`` of the model built with ``args``, as a standalone model.

    Raises:
        ValueError: ``name`` is not a nested builder.
    """
    base = inspect.unwrap(REGISTRY.get("model", name).obj)
    if base not in _SLICERS:
        raise ValueError(
            f"model {name!r} is not a nested model; nested builders: {sorted(f.__name__ for f in _SLICERS)}"
        )
    out = _SLICERS[base](dict(args), width, depth)
    out.update(widths=[1.0], depths=[depth])
    return out


# -- early exits ------------------------------------------------------------------------------------


def _check_base(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate ``{name: <model>, **args}`` against the named builder; defaults filled in."""
    name = spec.get("name")
    if not isinstance(name, str):
        raise ValueError("expected a model spec with `name:` and the model's arguments")
    entry = REGISTRY.get("model", name, path="base.name")
    params = {p.name: p for p in entry.params()}
    out: dict[str, Any] = {"name": name}
    for key, value in spec.items():
        if key == "name":
            continue
        if key not in params:
            raise ValueError(f"unknown argument {key!r} for model {name!r}; expected {', '.join(params)}")
        out[key] = TypeAdapter(params[key].annotation).validate_python(value)
    for key, p in params.items():
        if key not in out:
            if p.required:
                raise ValueError(f"model {name!r} needs argument {key!r}")
            out[key] = p.default
    return out


ModelSpec = Annotated[dict[str, Any], AfterValidator(_check_base)]


def _dummy_input(model: StackModel, in_shape: tuple[int, ...]) -> torch.Tensor:
    tokens = any(isinstance(m, nn.Embedding) for m in model.stem.modules())
    return torch.zeros(1, *in_shape, dtype=torch.long) if tokens else torch.zeros(1, *in_shape)


def _exit_head(base_head: nn.Module, shape: tuple[int, ...], num_classes: int, hidden: int) -> nn.Module:
    """A head like the model's own for a hidden state of per-sample ``shape``; with ``hidden`` > 0,
    one more layer first (a stride-2 3x3 conv block for feature maps, as the small convolutional
    classifiers of multi-exit CNNs such as MSDNet, Huang et al., 2018; a dense layer otherwise)."""
    if not isinstance(base_head, ClassifierHead):
        raise ValueError(
            f"early_exit: exit heads are built like a ClassifierHead; the model's head is {type(base_head).__name__}"
        )
    spatial = base_head.pool == "spatial"
    dim = shape[0] if spatial else shape[-1]
    norm = not isinstance(base_head.norm, nn.Identity)
    if not hidden:
        return ClassifierHead(dim, num_classes, pool=base_head.pool, norm=norm)
    first = ConvBlock(dim, hidden, stride=2, norm="batch") if spatial else DenseLayer(dim, hidden)
    return nn.Sequential(first, ClassifierHead(hidden, num_classes, pool=base_head.pool, norm=norm))


def _exit_costs(model: StackModel, exits: dict[int, nn.Module], x: torch.Tensor) -> list[float]:
    """FLOPs of the model cut at each exit (answering there), then of the full model, relative to
    the full model: the JEI-DNN costs ``c_k``. Counted with the registered formulas, so attention
    and grouped-matmul experts are priced (a raw ``FlopCounterMode`` prices them at 0 on the CPU)."""
    pieces = stack_flops(model, x, exits=exits)  # eval mode: one probe sample leaves no batch-norm trace
    full = pieces.full
    costs = [pieces.truncated(i) for i in sorted(exits)]
    return [c / full for c in costs] + [1.0] if full else [0.0] * len(costs) + [1.0]


@register("model", "early_exit", injected=DATA_ARGS)
def early_exit(
    in_shape: tuple[int, ...],
    num_classes: int,
    base: ModelSpec | None = None,
    exits: list[int] | None = None,
    exit_hidden: Annotated[int, Field(ge=0)] = 0,
    policy: ExitPolicy = "confidence",
    threshold: Annotated[float, Field(ge=0, le=1)] = 0.9,
    objective: ExitObjective = "weighted",
    weights: list[Annotated[float, Field(ge=0)]] | None = None,
    temperature: Annotated[float, Field(gt=0)] = 3.0,
    distill_weight: Annotated[float, Field(ge=0, le=1)] = 0.5,
    teacher: Teacher = "final",
    cost_weight: Annotated[float, Field(ge=0)] = 0.1,
    phase_steps: Annotated[int, Field(ge=1)] = 20,
) -> EarlyExit:
    """Any registered stack model with exit heads after body layers (early exits).

    Args:
        base: the model, ``{name: <model>, <its arguments>}`` (default ``{name: cnn}``).
        exits: body layer indices with an exit (default: every layer but the last).
        exit_hidden: 0 for exit heads like the model's head; else the width of one extra layer
            in each exit head (a 3x3 stride-2 conv block on feature maps, a dense layer otherwise).
        policy, threshold: inference exit rule (confidence, entropy or learned gate).
        objective: ``weighted`` losses, ``depth_weighted`` (ModularStarEncoder), BYOT
            self-``distill``ation, ``jei`` (JEI-DNN's alternating joint training of heads and
            gates) or ``joint_gates`` (heads on the plain sum, gates on the expected loss).
        weights: loss weight per exit and then the final head (default all 1).
        temperature, distill_weight, teacher: self-distillation settings.
        cost_weight: JEI-DNN's lambda on the relative FLOPs of each exit.
        phase_steps: ``jei``: optimizer steps per alternating phase (heads, then gates).

    Shapes:
        as the base model.
    """
    spec = dict(base or {"name": "cnn"})
    entry = REGISTRY.get("model", spec.pop("name"))
    injected = {"in_shape": tuple(in_shape), "num_classes": num_classes}
    model = entry.obj(**{k: v for k, v in injected.items() if k in entry.injected}, **entry.call_args(spec))
    if not isinstance(model, StackModel):
        raise ValueError(f"early_exit: {entry.name!r} does not build a StackModel")
    n = len(model.body)
    layers = sorted({i % n for i in (exits if exits is not None else range(n - 1))})
    x = _dummy_input(model, tuple(in_shape))
    model.eval()  # probing shapes and costs with one sample must not touch batch-norm statistics
    shapes = model.layer_shapes(x)
    heads = {i: _exit_head(model.head, shapes[i], num_classes, exit_hidden) for i in layers}
    costs = _exit_costs(model, heads, x)
    model.train()
    features: GateFeatures = "jei" if objective == "jei" else "prediction"  # JEI-DNN's gates read four features
    gated = policy == "gate" or objective in GATED_OBJECTIVES
    gates = {i: ExitGate(features) for i in heads} if gated else None
    return EarlyExit(
        model,
        heads,
        gates=gates,
        policy=policy,
        threshold=threshold,
        objective=objective,
        weights=weights,
        temperature=temperature,
        distill_weight=distill_weight,
        teacher=teacher,
        costs=costs,
        cost_weight=cost_weight,
        phase_steps=phase_steps,
    )
