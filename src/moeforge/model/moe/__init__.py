"""Mixture-of-Experts: router, token dispatch, grouped experts, load balancing and the MoE layer."""

from moeforge.model.moe.balance import (
    batch_aux_loss,
    load_stats,
    router_z_loss,
    sequence_aux_loss,
    update_expert_bias,
    update_expert_biases,
)
from moeforge.model.moe.dispatch import LocalDispatcher, TokenDispatcher
from moeforge.model.moe.experts import RoutedExperts
from moeforge.model.moe.layer import MoE, MoEStats
from moeforge.model.moe.router import Router, RouterOutput

__all__ = [
    "LocalDispatcher",
    "MoE",
    "MoEStats",
    "RoutedExperts",
    "Router",
    "RouterOutput",
    "TokenDispatcher",
    "batch_aux_loss",
    "load_stats",
    "router_z_loss",
    "sequence_aux_loss",
    "update_expert_bias",
    "update_expert_biases",
]
