"""Measurements of models and runs; nothing here changes a model.

Compute (parameters, executed FLOPs), latency (one timing harness), calibration, routing and
modularity statistics, equal-size clustering of units, early-exit simulation, Pareto fronts
and the plots of a report.
"""

from brickwork.analysis.calibration import Reliability, expected_calibration_error, reliability
from brickwork.analysis.clustering import (
    balanced_kmeans,
    cluster_units,
    coactivation_partition,
    correlation,
    kmeans_partition,
    labels_to_partition,
    partition_to_labels,
    random_partition,
)
from brickwork.analysis.compute import (
    Compute,
    FlopMeter,
    StackFlops,
    accuracy_and_flops,
    count_params,
    measure_compute,
    register_flops,
    stack_flops,
    subnet_flops,
)
from brickwork.analysis.embedding_eval import EvalSets, embed, probe_accuracy, quality, wordsim_spearman
from brickwork.analysis.exits import exit_outputs, exit_scores, per_exit, simulate
from brickwork.analysis.matryoshka import matryoshka_accuracy
from brickwork.analysis.modularity import layer_modularity, newman_modularity, routing_by_class
from brickwork.analysis.pareto import pareto_front
from brickwork.analysis.plots import plot_accuracy_vs, plot_accuracy_vs_flops, plot_curves, plot_exit_curves
from brickwork.analysis.routing import RoutingStats, expert_specialisation, routing_stats, routing_summary
from brickwork.analysis.timing import describe_machine, interleaved, measure_latency, paired_ratio, time_rounds
from brickwork.analysis.tradeoff import measure_point

__all__ = [
    "Compute",
    "EvalSets",
    "FlopMeter",
    "Reliability",
    "RoutingStats",
    "StackFlops",
    "accuracy_and_flops",
    "balanced_kmeans",
    "cluster_units",
    "coactivation_partition",
    "correlation",
    "count_params",
    "describe_machine",
    "embed",
    "exit_outputs",
    "exit_scores",
    "expected_calibration_error",
    "expert_specialisation",
    "interleaved",
    "kmeans_partition",
    "labels_to_partition",
    "layer_modularity",
    "matryoshka_accuracy",
    "measure_compute",
    "measure_latency",
    "measure_point",
    "newman_modularity",
    "paired_ratio",
    "pareto_front",
    "partition_to_labels",
    "per_exit",
    "plot_accuracy_vs",
    "plot_accuracy_vs_flops",
    "plot_curves",
    "plot_exit_curves",
    "probe_accuracy",
    "quality",
    "random_partition",
    "register_flops",
    "reliability",
    "routing_by_class",
    "routing_stats",
    "routing_summary",
    "simulate",
    "stack_flops",
    "subnet_flops",
    "time_rounds",
    "wordsim_spearman",
]
