"""Measurements of models and runs; nothing here changes a model.

Compute (parameters, executed FLOPs), latency (one timing harness), calibration, routing and
modularity statistics, equal-size clustering of units, early-exit simulation, linear mode
connectivity (paths and barriers between two models), Pareto fronts and the plots of a report.

The names below are imported from their modules on first access (PEP 562), so that a module
which needs one measurement (``brickwork.analysis.compute``) does not load matplotlib and scipy
with the plots and the clustering: the command line starts about a second sooner.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and editors; at runtime __getattr__ imports on demand
    from brickwork.analysis.arank import (
        arank_mod_layers,
        attention_ranks,
    )
    from brickwork.analysis.calibration import (
        Reliability,
        expected_calibration_error,
        reliability,
    )
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
    from brickwork.analysis.embedding_eval import (
        EvalSets,
        embed,
        probe_accuracy,
        quality,
        wordsim_spearman,
    )
    from brickwork.analysis.exits import (
        exit_outputs,
        exit_scores,
        per_exit,
        simulate,
    )
    from brickwork.analysis.matryoshka import (
        matryoshka_accuracy,
    )
    from brickwork.analysis.modularity import (
        layer_modularity,
        newman_modularity,
        routing_by_class,
    )
    from brickwork.analysis.pareto import (
        pareto_front,
    )
    from brickwork.analysis.plots import (
        plot_accuracy_vs,
        plot_accuracy_vs_flops,
        plot_curves,
        plot_exit_curves,
        plot_linear_paths,
    )
    from brickwork.analysis.routing import (
        RoutingStats,
        expert_specialisation,
        routing_stats,
        routing_summary,
    )
    from brickwork.analysis.timing import (
        describe_machine,
        interleaved,
        measure_latency,
        paired_ratio,
        time_rounds,
    )
    from brickwork.analysis.tradeoff import (
        measure_point,
    )

# name -> the module of this package that defines it
_HOME: dict[str, str] = {
    "Compute": "compute",
    "EvalSets": "embedding_eval",
    "FlopMeter": "compute",
    "LinearPath": "connectivity",
    "Reliability": "calibration",
    "RoutingStats": "routing",
    "StackFlops": "compute",
    "accuracy_and_flops": "compute",
    "arank_mod_layers": "arank",
    "attention_ranks": "arank",
    "balance_labels": "clustering",
    "balanced_kmeans": "clustering",
    "check_same_architecture": "connectivity",
    "cluster_units": "clustering",
    "coactivation_partition": "clustering",
    "correlation": "clustering",
    "count_params": "compute",
    "describe_machine": "timing",
    "embed": "embedding_eval",
    "evaluate_loss_accuracy": "connectivity",
    "exit_outputs": "exits",
    "exit_scores": "exits",
    "expected_calibration_error": "calibration",
    "expert_specialisation": "routing",
    "interleaved": "timing",
    "interpolate": "connectivity",
    "kmeans_partition": "clustering",
    "labels_to_partition": "clustering",
    "layer_modularity": "modularity",
    "linear_path": "connectivity",
    "matryoshka_accuracy": "matryoshka",
    "measure_compute": "compute",
    "measure_latency": "timing",
    "measure_point": "tradeoff",
    "metis_available": "clustering",
    "metis_partition": "clustering",
    "newman_modularity": "modularity",
    "paired_ratio": "timing",
    "parameter_distance": "connectivity",
    "pareto_front": "pareto",
    "partition_to_labels": "clustering",
    "path_alphas": "connectivity",
    "per_exit": "exits",
    "plot_accuracy_vs": "plots",
    "plot_accuracy_vs_flops": "plots",
    "plot_curves": "plots",
    "plot_exit_curves": "plots",
    "plot_linear_paths": "plots",
    "probe_accuracy": "embedding_eval",
    "quality": "embedding_eval",
    "random_partition": "clustering",
    "register_flops": "compute",
    "reliability": "calibration",
    "reset_batch_norm": "connectivity",
    "routing_by_class": "modularity",
    "routing_stats": "routing",
    "routing_summary": "routing",
    "simulate": "exits",
    "spectral_partition": "clustering",
    "stack_flops": "compute",
    "subnet_flops": "compute",
    "time_rounds": "timing",
    "wordsim_spearman": "embedding_eval",
}

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


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
        globals()[name] = value  # later lookups do not come back here
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
