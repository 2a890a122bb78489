"""`moeforge report` and the end-of-run report: non-empty PNGs, one heatmap panel per MoE layer."""

import json
import sys

import pytest
from conftest import SMALL, small_config

from moeforge.cli import main as cli_main
from moeforge.run_plots import ReportError, plot_expert_load, report_after_training, write_report

matplotlib = pytest.importorskip("matplotlib")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_run(path, n_layers=3, n_experts=6, steps=(10, 20, 30, 35), mtp=False):
    path.mkdir(parents=True)
    records = []
    for step in steps:
        load = [
            {"tokens_per_expert": [step * (e + layer + 1) for e in range(n_experts)], "max_violation": 0.5 / step}
            for layer in range(n_layers)
        ]
        record = {"step": step, "loss": 3.0 / step, "lm_loss": 2.9 / step, "aux_loss": 1e-4, "aux": {"seq_aux": 1e-4},
                  "load": load}
        if step == steps[-1]:
            record["val_loss"] = 3.1 / step
        if mtp:
            record.update({"mtp_loss": 0.3 * 3.5 / step, "mtp_lambda": 0.3, "mtp/1": 3.5 / step})
        records.append(record)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def heatmap_panels(fig):
    """Axes that draw a heatmap, not counting the colour bar."""
    from matplotlib.collections import QuadMesh

    drawn = [ax for ax in fig.axes if any(isinstance(c, QuadMesh) for c in ax.collections)]
    return [ax for ax in drawn if ax.get_label() != "<colorbar>"]


def test_report_command_writes_the_three_pngs(tmp_path, capsys):
    run = synthetic_run(tmp_path / "run", mtp=True)
    assert cli_main(["report", str(run)]) == 0
    written = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[-1] for p in written] == ["losses.png", "expert_load.png", "max_violation.png"]
    for name in written:
        assert_png(run / "report" / name.rsplit("/", 1)[-1])


def test_loss_figure_has_an_mtp_panel_with_the_losses_but_not_the_weight(tmp_path):
    import matplotlib.pyplot as plt

    from moeforge.run_plots import plot_losses
    from moeforge.run import read_metrics

    fig = plot_losses(plt, read_metrics(synthetic_run(tmp_path / "run", mtp=True)))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Language-model loss", "Multi-token prediction", "Balance losses (added to the loss)"]
    mtp_labels = [line.get_label() for line in fig.axes[1].get_lines()]
    assert mtp_labels == ["depth 1 cross-entropy", "weighted MTP loss (added to the loss)"]
    plt.close(fig)


@pytest.mark.parametrize("n_layers", [1, 3, 6])
def test_heatmap_has_one_panel_per_moe_layer(tmp_path, n_layers):
    import matplotlib.pyplot as plt

    from moeforge.run import read_metrics

    records = read_metrics(synthetic_run(tmp_path / "run", n_layers=n_layers))
    fig = plot_expert_load(plt, records, first_block=1)
    panels = heatmap_panels(fig)
    assert len(panels) == n_layers
    assert [ax.get_title() for ax in panels][-1] == f"MoE layer {n_layers - 1} (block {n_layers})"
    plt.close(fig)


def test_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(ReportError, match="no metrics.jsonl"):
        write_report(tmp_path)
    assert cli_main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_training_writes_the_report_and_skips_it_without_matplotlib(tmp_path, monkeypatch, capsys):
    flags = [part for key, value in SMALL.items() for part in (f"--{key}", value)]
    assert cli_main(["train", "--out", str(tmp_path / "run"), *flags, "--train.steps", "3", "--train.report", "true"]) == 0
    for name in ("losses.png", "expert_load.png", "max_violation.png"):
        assert_png(tmp_path / "run" / "report" / name)
    import matplotlib.pyplot as plt

    from moeforge.run import read_metrics

    cfg = small_config()
    moe_layers = sum(cfg.model.is_moe_layer(layer) for layer in range(cfg.model.n_layers))
    fig = plot_expert_load(plt, read_metrics(tmp_path / "run"))
    assert len(heatmap_panels(fig)) == moe_layers == 2
    plt.close(fig)

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert report_after_training(tmp_path / "run") is None
    assert "report skipped: matplotlib is not installed" in capsys.readouterr().err
