"""Measurements of models and runs; nothing here changes a model.

Compute (parameters, executed FLOPs), latency (one timing harness), calibration, routing and
modularity statistics, equal-size clustering of units, early-exit simulation, linear mode
connectivity (paths and barriers between two models), Pareto fronts and the plots of a report.
"""

from brickwork.analysis.arank import arank_mod_layers, attention_ranks
from brickwork.analysis.calibration import Reliability, expected_calibration_error, reliability
from brickwork.analysis.clustering import (
    balance_labels,
    balanced_kmeans,
    cluster_units,
    coactivation_partition,
    correlation,
    kmeans_partition,
    labels_to_partition,
    metis_available,
    metis_partition,
    partition_to_labels,
    random_partition,
    spectral_partition,
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
from brickwork.analysis.connectivity import (
    LinearPath,
    check_same_architecture,
    evaluate_loss_accuracy,
    interpolate,
    linear_path,
    parameter_distance,
    path_alphas,
    reset_batch_norm,
)
from brickwork.analysis.embedding_eval import EvalSets, embed, probe_accuracy, quality, wordsim_spearman
from brickwork.analysis.exits import exit_outputs, exit_scores, per_exit, simulate
from brickwork.analysis.matryoshka import matryoshka_accuracy
from brickwork.analysis.modularity import layer_modularity, newman_modularity, routing_by_class
from brickwork.analysis.pareto import pareto_front
from brickwork.analysis.plots import (
    plot_accuracy_vs,
    plot_accuracy_vs_flops,
    plot_curves,
    plot_exit_curves,
    plot_linear_paths,
)
from brickwork.analysis.routing import RoutingStats, expert_specialisation, routing_stats, routing_summary
from brickwork.analysis.timing import describe_machine, interleaved, measure_latency, paired_ratio, time_rounds
from brickwork.analysis.tradeoff import measure_point

__all__ = [
    "Compute",
    "EvalSets",
    "FlopMeter",
    "LinearPath",
    "Reliability",
    "RoutingStats",
    "StackFlops",
    "accuracy_and_flops",
    "arank_mod_layers",
    "attention_ranks",
    "balance_labels",
    "balanced_kmeans",
    "check_same_architecture",
    "cluster_units",
    "coactivation_partition",
    "correlation",
    "count_params",
    "describe_machine",
    "embed",
    "evaluate_loss_accuracy",
    "exit_outputs",
    "exit_scores",
    "expected_calibration_error",
    "expert_specialisation",
    "interleaved",
    "interpolate",
    "kmeans_partition",
    "labels_to_partition",
    "layer_modularity",
    "linear_path",
    "matryoshka_accuracy",
    "measure_compute",
    "measure_latency",
    "measure_point",
    "metis_available",
    "metis_partition",
    "newman_modularity",
    "paired_ratio",
    "parameter_distance",
    "pareto_front",
    "partition_to_labels",
    "path_alphas",
    "per_exit",
    "plot_accuracy_vs",
    "plot_accuracy_vs_flops",
    "plot_curves",
    "plot_exit_curves",
    "plot_linear_paths",
    "probe_accuracy",
    "quality",
    "random_partition",
    "register_flops",
    "reliability",
    "reset_batch_norm",
    "routing_by_class",
    "routing_stats",
    "routing_summary",
    "simulate",
    "spectral_partition",
    "stack_flops",
    "subnet_flops",
    "time_rounds",
    "wordsim_spearman",
]
