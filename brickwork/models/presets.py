"""Named presets: the second level of builders, each a component builder with set defaults."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from brickwork.registry import register

# Arguments a model builder receives from the dataset rather than from the config.
DATA_ARGS = ("in_shape", "num_classes")


def preset(builder: Callable[..., Any], name: str, description: str, **defaults: Any) -> Callable[..., Any]:
    """Register ``name`` as ``builder`` with new defaults; every argument stays overridable.

    The preset's signature is the builder's with the defaults replaced, so config validation
    and ``brickwork ls`` see the real types and the preset's values.
    """

    @functools.wraps(builder)
    def build(*args: Any, **kwargs: Any) -> Any:
        return builder(*args, **{**defaults, **kwargs})

    sig = inspect.signature(builder)
    build.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p.replace(default=defaults[p.name]) if p.name in defaults else p for p in sig.parameters.values()]
    )
    build.__doc__ = description
    register("model", name, description, injected=DATA_ARGS)(build)
    return build
