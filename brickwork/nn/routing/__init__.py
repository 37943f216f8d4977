"""Routing: routers (bricks of kind ``router``), balancing, dispatch and expert banks.

Every router maps (..., D) to a :class:`Routing` (a flat list of token/expert/weight
assignments plus its auxiliary losses); routed layers (:class:`brickwork.nn.moe.MoE`) turn it
into computation and leave a :class:`RoutingRecord` behind. Every router lives here and is
registered under kind ``router``; :class:`MoESettings` and :func:`build_router` are the one way
a name becomes a router.
"""

from brickwork.nn.routing.balance import SelectionBias
from brickwork.nn.routing.dense_to_sparse import DenseToSparseRouter, activation_dense_to_sparse
from brickwork.nn.routing.dispatch import DispatchPlan, expert_capacity, plan_dispatch
from brickwork.nn.routing.expert_choice import ExpertChoiceRouter
from brickwork.nn.routing.experts import ExpertList, GroupedFFNExperts
from brickwork.nn.routing.hash import HashRouter, feed_token_ids, wants_token_ids
from brickwork.nn.routing.key_routers import KeyBank, KeyRouter, MLPRouter
from brickwork.nn.routing.losses import cv_squared, load_balance_loss, router_z_loss, smooth_load
from brickwork.nn.routing.noisy_topk import NoisyTopKRouter
from brickwork.nn.routing.schedule import anneal
from brickwork.nn.routing.settings import Balance, MoESettings, RouterName, build_router
from brickwork.nn.routing.token_hash import (
    TokenHashRouter,
    balance_token_hash,
    frequency_balanced_table,
    random_balanced_table,
    token_hash_frequency,
)
from brickwork.nn.routing.topk import TopKRouter, sigmoid_topk
from brickwork.nn.routing.types import Routing, RoutingRecord, token_choice_routing

__all__ = [
    "Balance",
    "DenseToSparseRouter",
    "DispatchPlan",
    "ExpertChoiceRouter",
    "ExpertList",
    "GroupedFFNExperts",
    "HashRouter",
    "KeyBank",
    "KeyRouter",
    "MLPRouter",
    "MoESettings",
    "NoisyTopKRouter",
    "Routing",
    "RouterName",
    "RoutingRecord",
    "SelectionBias",
    "TokenHashRouter",
    "TopKRouter",
    "activation_dense_to_sparse",
    "anneal",
    "balance_token_hash",
    "build_router",
    "cv_squared",
    "expert_capacity",
    "feed_token_ids",
    "frequency_balanced_table",
    "load_balance_loss",
    "plan_dispatch",
    "random_balanced_table",
    "router_z_loss",
    "sigmoid_topk",
    "smooth_load",
    "token_choice_routing",
    "token_hash_frequency",
    "wants_token_ids",
]
