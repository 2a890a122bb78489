"""The planner: for a model and a cluster, what a layout holds in memory per GPU, what it sends, how
long its pipeline idles and how fast a step goes, and which layouts are best (`moeforge plan`).

Modules, one job each: `cluster` (the GPUs and their links, presets in clusters/*.toml), `layout`
(how a run is spread), `tensors` (the model's parameters, from a meta-device build), `memory`,
`comm`, `pipeline` (bubble formulas), `block_flops` (training FLOPs per token of each block),
`memory_traffic` (bytes of the non-matmul work), `op_counts` (operators a step dispatches),
`step_communication` (what a step sends, and its seconds), `step_time` (the plan of one layout),
`search`, `summary` (a plan or a search as a table or a dict), and `estimate` (the one-line
estimate the trainer prints).
"""

from moeforge.plan.cluster import Cluster, available_clusters, load_cluster
from moeforge.plan.estimate import RunEstimate, device_peak_flops, estimate_run
from moeforge.plan.layout import Layout, layout_from_config
from moeforge.plan.search import search_layouts
from moeforge.plan.step_time import Plan, TrainingShape, plan_layout, sharded_bytes

__all__ = [
    "Cluster",
    "Layout",
    "Plan",
    "RunEstimate",
    "TrainingShape",
    "available_clusters",
    "device_peak_flops",
    "estimate_run",
    "layout_from_config",
    "load_cluster",
    "plan_layout",
    "search_layouts",
    "sharded_bytes",
]
