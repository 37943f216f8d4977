"""How a mixture-of-experts layer routes: one settings type, and routers built from it by name.

:class:`MoESettings` is defined once and taken by :func:`~brickwork.nn.moe.moe_ffn` and the MoE
model builders (``moe_mlp``, ``moe_lm``); configs set its fields flat (``router: hash,
top_k: 1``). :func:`build_router` resolves ``router`` in the registry (kind ``router``, so the
names are exactly those ``brickwork ls router`` lists) and passes each router the settings it
takes, matched by the name of the router's own argument:

==============  =====================================================================
setting         router argument it sets
==============  =====================================================================
``top_k``       ``top_k``; for expert choice ``capacity_factor`` (c, the average
                experts per token, Zhou et al., 2022)
``noise``       ``noise``
``balance``     ``load_balance`` (on for ``aux_loss``) and ``balance_rate`` (the
                DeepSeek-V3 selection bias, on for ``aux_free``)
==============  =====================================================================

A setting that the chosen router has no argument for (``top_k`` for a dense-to-sparse gate,
which picks experts by a threshold; ``noise`` for expert choice) must stay at its default:
:meth:`MoESettings.check` rejects anything else, naming the key, rather than dropping it.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Literal

import pydantic
import torch
from pydantic.dataclasses import dataclass
from torch import nn

from brickwork.errors import ConfigError
from brickwork.nn.routing.topk import Noise
from brickwork.registry import REGISTRY, Entry, RegistryName

# How the experts' load is balanced:
# * aux_loss: the router emits the Switch/GShard "load_balance" loss (weighted by aux_weights);
# * aux_free: a per-expert selection bias nudged towards balance after every step (DeepSeek-V3);
# * none: no balancing.
Balance = Literal["aux_loss", "aux_free", "none"]

RouterName = Annotated[str, RegistryName("router")]


@dataclass(frozen=True, config=pydantic.ConfigDict(extra="forbid"))
class MoESettings:
    """How the tokens of a mixture-of-experts FFN are routed and dispatched.

    Attributes:
        top_k: experts per token (token-choice and hash routers, ``emoe``, ``mlp``); for
            ``expert_choice`` the capacity factor c, the average experts per token. Not used by
            the dense-to-sparse gates, which choose experts by a threshold.
        router: a registered router name (``brickwork ls router``).
        capacity_factor: None for dropless dispatch; otherwise each expert processes at most
            ``ceil(capacity_factor * assignments / E)`` rows and the overflow is dropped.
        balance: ``aux_loss`` (Switch loss), ``aux_free`` (DeepSeek-V3 bias, no loss) or ``none``.
        balance_rate: update rate of the ``aux_free`` bias.
        noise: router exploration noise during training (token-choice routers).
    """

    top_k: Annotated[int, pydantic.Field(ge=1)] = 2
    router: RouterName = "topk"
    capacity_factor: Annotated[float, pydantic.Field(gt=0)] | None = None
    balance: Balance = "aux_loss"
    balance_rate: Annotated[float, pydantic.Field(gt=0)] = 1e-3
    noise: Noise = "none"

    def router_kwargs(self, entry: Entry) -> dict[str, Any]:
        """The keyword arguments these settings give the router ``entry`` (see the module table)."""
        params = _arg_names(entry)
        kw: dict[str, Any] = {}
        if "top_k" in params:
            kw["top_k"] = self.top_k
        elif "capacity_factor" in params:  # expert choice: c = average experts per token
            kw["capacity_factor"] = float(self.top_k)
        if "noise" in params:
            kw["noise"] = self.noise
        if "load_balance" in params:
            kw["load_balance"] = self.balance == "aux_loss"
        if "balance_rate" in params:
            kw["balance_rate"] = self.balance_rate if self.balance == "aux_free" else 0.0
        return kw

    def check(self, path: str = "") -> None:
        """Reject a setting the chosen router does not use unless it is at its default.

        Args:
            path: key path of these settings in a config (``models.moe``), for the message.

        Raises:
            ConfigError: naming the key, e.g. ``models.moe.top_k``.
        """
        entry = REGISTRY.get("router", self.router, path=_key(path, "router"))
        params = _arg_names(entry)
        default = MoESettings()
        if self.balance_rate != default.balance_rate and self.balance != "aux_free":
            raise ConfigError(
                _key(path, "balance_rate"),
                "is the rate of balance 'aux_free' only; "
                f"leave it at its default {default.balance_rate!r} with balance {self.balance!r}",
                self.balance_rate,
            )
        unused = {
            "top_k": not params & _TARGETS["top_k"],
            "noise": not params & _TARGETS["noise"],
            "balance": self.balance != "none" and not params & _TARGETS[self.balance],
        }
        for name, ignored in unused.items():
            value = getattr(self, name)
            if ignored and value != getattr(default, name):
                targets = _TARGETS[value if name == "balance" else name]
                users = [e.name for e in REGISTRY.list("router") if _arg_names(e) & targets]
                raise ConfigError(
                    _key(path, name),
                    f"router {self.router!r} does not use this setting; leave it "
                    f"at its default {getattr(default, name)!r} or choose a router that uses it "
                    f"({', '.join(users)})",
                    value,
                )


# The router arguments each setting (or balance mode) sets; a router with none of them ignores it.
_TARGETS = {
    "top_k": {"top_k", "capacity_factor"},
    "noise": {"noise"},
    "aux_loss": {"load_balance"},
    "aux_free": {"balance_rate"},
}


def build_router(
    settings: MoESettings,
    dim: int,
    num_experts: int,
    *,
    bank: nn.Module | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The router ``settings.router`` for ``num_experts`` experts of width ``dim``, from the registry.

    Args:
        settings: the routing settings (checked with :meth:`MoESettings.check`).
        dim: input width D.
        num_experts: E.
        bank: the expert bank, for routers that read the experts' keys (``emoe``, ``mlp``).
        device, dtype: of the router's parameters.
    """
    settings.check()
    entry = REGISTRY.get("router", settings.router)
    params = _arg_names(entry)
    kw = settings.router_kwargs(entry)
    if "bank" in params and bank is not None:
        kw["bank"] = bank
    kw.update({k: v for k, v in (("device", device), ("dtype", dtype)) if k in params})
    return entry.obj(dim, num_experts, **kw)


def _arg_names(entry: Entry) -> set[str]:
    target = entry.obj.__init__ if inspect.isclass(entry.obj) else entry.obj
    return set(inspect.signature(target).parameters)


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
