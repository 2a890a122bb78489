"""`moeforge plan`: memory, traffic, pipeline bubble and step time of a layout on a cluster, or with
--search every valid layout that fits, ranked; `--layout.*` and `--cluster.*` flags over the run's
and the cluster preset's values."""

from __future__ import annotations

import argparse
import json

from moeforge.cli.arguments import parse_overrides
from moeforge.config import ConfigError, available_presets, format_choices, iter_options, load_config


def add_parser(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser(
        "plan",
        help="memory, traffic, pipeline bubble and step time of a layout on a cluster; --search ranks layouts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_options_help(),
    )
    plan.add_argument("--config", help="a run's TOML file (model, train, parallel, diloco)")
    plan.add_argument("--preset", help=f"a model preset: {', '.join(available_presets())} (default: tiny)")
    plan.add_argument("--from-hf", metavar="DIR", help="take the model from a Hugging Face config.json")
    plan.add_argument(
        "--cluster", required=True, help="a cluster preset (h100, h200, h800, b200) or a TOML file"
    )
    plan.add_argument("--gpus", type=int, required=True, help="GPUs in the run")
    plan.add_argument("--search", action="store_true", help="rank every valid layout that fits")
    plan.add_argument(
        "--top",
        type=int,
        default=10,
        help="--search: pipeline shapes shown, the fastest layout of each (default: 10)",
    )
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.set_defaults(handler=run)


def _options_help() -> str:
    from moeforge.plan import Cluster, Layout

    lines = [
        "layout options (--layout.field-name VALUE; defaults come from the run's parallel.* and diloco.*):"
    ]
    for prefix, obj in (("layout.", Layout()), ("cluster.", Cluster())):
        if prefix == "cluster.":
            lines.append("cluster options (--cluster.field-name VALUE, over the preset's values):")
        for option in iter_options(obj, prefix):
            allowed = f" (allowed: {format_choices(option.choices)})" if option.choices else ""
            lines.append(f"  --{option.flag} {option.default!r}{allowed}\n      {option.doc}")
    lines.append("model and batch: --model.*, --train.global-batch-size, --train.seq-len, as for `train`")
    return "\n".join(lines)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from moeforge.interop import apply_hf_model
    from moeforge.plan import TrainingShape, layout_from_config, load_cluster, plan_layout, search_layouts
    from moeforge.plan.search import best_per_shape, candidate_layouts
    from moeforge.plan.summary import format_plan, format_search

    if args.gpus < 1:
        raise ConfigError(f"--gpus: got {args.gpus}; allowed: an integer >= 1")
    overrides = parse_overrides(rest)
    layout_flags = _take_section(overrides, "layout")
    cluster = load_cluster(args.cluster, _take_section(overrides, "cluster"))
    if args.from_hf:
        overrides["train.init-from-hf"] = args.from_hf
    pp = 1 if args.search else _pipeline_degree(layout_flags, args.gpus)
    cfg = load_config(
        args.preset, args.config, overrides, world_size=args.gpus // pp, apply_init_from=apply_hf_model
    )
    layout = layout_from_config(cfg, layout_flags)
    shape = TrainingShape(cfg.train.global_batch_size, cfg.train.seq_len)
    if args.search:
        plans = search_layouts(cfg.model, layout, cluster, shape, args.gpus)
        shown = best_per_shape(plans, args.top)
        if args.json:
            print(json.dumps([{"rank": rank, **plan.to_dict()} for rank, plan in shown]))
        else:
            considered = sum(
                1 for _ in candidate_layouts(cfg.model, layout, args.gpus, cluster.gpus_per_node)
            )
            print(format_search(shown, len(plans), considered))
        return 0
    layout.validate(args.gpus, cluster.gpus_per_node)
    plan = plan_layout(cfg.model, layout, cluster, shape)
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan))
    return 0


def _take_section(overrides: dict[str, str], section: str) -> dict[str, str]:
    """Remove the `section.*` overrides from `overrides` and return them without the prefix."""
    taken = {
        key.split(".", 1)[1]: overrides.pop(key) for key in list(overrides) if key.startswith(f"{section}.")
    }
    return taken


def _pipeline_degree(layout_flags: dict[str, str], gpus: int) -> int:
    """--layout.pp, checked to divide the GPUs (the run config's parallel.* lays out the rest)."""
    text = layout_flags.get("pp", "1")
    if not text.isdigit() or int(text) < 1 or gpus % int(text):
        raise ConfigError(f"--layout.pp: got {text!r}; allowed: an integer >= 1 dividing --gpus={gpus}")
    return int(text)
