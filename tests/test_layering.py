"""The package layers, lowest first, and the one import rule: a module imports only from its own
package, or from a package of a lower layer (never a sibling of its layer, never one above).

    errors, runtime, durable      (durable: fsync a written file, a directory)
    in_flight                     a result still in flight (`Pending`) and an exchange's times
    safe_paths                    files named by other files, opened inside their directory only
    config
    model                         plain single-device modules: no process groups, no collectives
    parallel
    diloco                        Streaming DiLoCo's outer loop, fragments and wire formats
    data                          corpus, tokenizers, loader
    run                           the run directory's layout
    checkpoint                    sharded checkpoints, and a model rebuilt from one
    plan                          the planner: memory, bytes, bubbles, step time (the trainer may use it)
    train, infer, interop, run_plots
    serve                         the continuous-batching engine and the OpenAI-compatible server
    bench                         benchmarks measure the trainer, the decoder and the importer, so
                                  they sit above them and call them directly (no hand-over)
    cli
    the package root and __main__ (the public API, `python -m moeforge`)

Every import counts, inside functions and under TYPE_CHECKING too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import moeforge

SOURCE = Path(moeforge.__file__).parent
LAYERS = [
    {"errors", "runtime", "durable"},
    {"in_flight"},
    {"safe_paths"},
    {"config"},
    {"model"},
    {"parallel"},
    {"diloco"},
    {"data"},
    {"run"},
    {"checkpoint"},
    {"plan"},
    {"train", "infer", "interop", "run_plots"},
    {"serve"},
    {"bench"},
    {"cli"},
    {"__main__", "__init__"},
]
LAYER_OF = {package: level for level, packages in enumerate(LAYERS) for package in packages}
MODEL_MAY_USE = ("torch.distributed.tensor",)
"""the one part of torch.distributed that model code may import: DTensor, for type checks"""


def package_of(module: str) -> str:
    """'moeforge.train.trainer' -> 'train'; 'moeforge' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path) -> list[str]:
    """Every module `path` imports, resolved to absolute names."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return found


def test_every_package_has_a_layer():
    unplaced = {package_of(name) for name in modules()} - set(LAYER_OF)
    assert not unplaced, f"place these packages in LAYERS: {sorted(unplaced)}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_respect_the_layers(name):
    own = package_of(name)
    wrong = []
    for imported in imports_of(name, modules()[name]):
        if not imported.startswith("moeforge.") or imported not in modules():
            continue
        other = package_of(imported)
        if other != own and LAYER_OF[other] >= LAYER_OF[own]:
            wrong.append(f"{imported} ({other}: layer {LAYER_OF[other]} >= {own}: layer {LAYER_OF[own]})")
    assert not wrong, f"{name} imports upward or sideways: {wrong}"


@pytest.mark.parametrize("name", sorted(n for n in modules() if package_of(n) == "model"))
def test_model_code_holds_no_process_group_code(name):
    distributed = [
        imported
        for imported in imports_of(name, modules()[name])
        if imported.startswith("torch.distributed") and not imported.startswith(MODEL_MAY_USE)
    ]
    assert not distributed, f"{name} imports {distributed}; distribute the model from parallel/ instead"
