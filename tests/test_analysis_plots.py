"""The routing plots (``moe_gen.analysis.plots``) draw what their docstrings promise: each figure
is caught as it is saved and its panels, images, scales and labels are read back."""

from __future__ import annotations

import numpy as np
import pytest

from moe_gen.analysis import plots


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plots save, in order (each still written as a PNG)."""
    figures = []
    original = plots._save

    def spy(fig, path):
        figures.append(fig)
        return original(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return figures


def _ticklabels(ax, axis="x"):
    return [t.get_text() for t in (ax.get_xticklabels() if axis == "x" else ax.get_yticklabels())]


def test_expert_heatmaps_one_transposed_panel_per_layer_on_one_scale(drawn, tmp_path):
    """Six layers of 3 groups × 4 experts: a 2 × 4 grid with two empty panels, each layer drawn
    expert × group under its own name, on one scale from 0 to the largest share, with a colour bar
    at the end of each row."""
    L, G, E = 6, 3, 4
    share_LGE = np.random.default_rng(0).uniform(0.1, 0.6, size=(L, G, E))
    layers, groups = [f"layer {i}" for i in range(L)], ["digits", "species", "motion"]
    path = str(tmp_path / "heatmaps.png")
    assert plots.plot_expert_heatmaps(share_LGE, layers, groups, path, title="by task") == path
    assert (tmp_path / "heatmaps.png").stat().st_size > 0
    (fig,) = drawn
    panels = fig.axes[:8]
    assert [len(ax.images) for ax in panels] == [1] * L + [0, 0]
    assert not any(ax.axison for ax in panels[L:])
    for layer, ax in enumerate(panels[:L]):
        image = ax.images[0]
        np.testing.assert_array_equal(image.get_array(), share_LGE[layer].T)  # rows: experts, columns: groups
        assert image.get_clim() == (0.0, share_LGE.max())
        assert ax.get_title() == f"layer {layer}"
        assert _ticklabels(ax) == groups and list(ax.get_yticks()) == list(range(E))
    assert len(fig.axes) - 8 == 2  # colour bars after layer 3 (end of the first row) and layer 5 (the last)
    assert fig.get_suptitle() == "by task"


def test_entropy_plot_draws_the_uniform_bound_and_starts_at_zero(drawn, tmp_path):
    plots.plot_entropy_by_layer({"attribute": [1.0, 1.5, 1.25]}, [2.0, 2.0, 2.0], ["l0", "l1", "l2"],
                                str(tmp_path / "entropy.png"))
    plots.plot_entropy_by_layer({"dense": [1.0, 1.5]}, [], ["l0", "l1"], str(tmp_path / "no_bound.png"))
    with_bound, without = (fig.axes[0] for fig in drawn)
    lines = {line.get_label(): line for line in with_bound.get_lines()}
    assert set(lines) == {"attribute", "log2 E (uniform)"}
    assert lines["log2 E (uniform)"].get_linestyle() == "--"
    assert list(lines["log2 E (uniform)"].get_ydata()) == [2.0, 2.0, 2.0]
    assert with_bound.get_ylim()[0] == 0.0 and _ticklabels(with_bound) == ["l0", "l1", "l2"]
    assert [line.get_label() for line in without.get_lines()] == ["dense"]


def test_interference_cells_read_row_i_column_j_and_undefined_ones_are_marked(drawn, tmp_path):
    """Row i is the task whose loss changes, column j the task whose step is taken: on a matrix that
    is not symmetric each cell's text sits at (x=j, y=i); a NaN cell reads "–" on the grey of the
    masked colour, and strong cells (|value| > 0.6, either sign) are written in white."""
    matrix = np.array([[1.0, -0.8, 0.1], [0.3, 1.0, np.nan], [np.nan, np.nan, np.nan]])
    tasks = ["a", "b", "c"]
    plots.plot_interference(matrix, tasks, str(tmp_path / "i.png"), title="my title")
    plots.plot_interference(matrix[:2, :2], tasks[:2], str(tmp_path / "default.png"))
    ax = drawn[0].axes[0]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert {key: t.get_text() for key, t in cells.items()} == {
        (0, 0): "1.00", (0, 1): "-0.80", (0, 2): "0.10", (1, 0): "0.30", (1, 1): "1.00", (1, 2): "–",
        (2, 0): "–", (2, 1): "–", (2, 2): "–"}
    assert cells[0, 1].get_color() == "white" and cells[0, 2].get_color() == "black"
    image = ax.images[0]
    assert image.get_clim() == (-1.0, 1.0)
    assert np.ma.getmaskarray(image.get_array()).tolist() == np.isnan(matrix).tolist()
    from matplotlib.colors import to_rgba

    assert tuple(image.cmap.get_bad()) == to_rgba("lightgrey")
    assert _ticklabels(ax) == tasks and _ticklabels(ax, "y") == tasks
    assert ax.get_title() == "my title"
    assert drawn[1].axes[0].get_title() == "task interference (cosine of task gradients)"


def test_dendrogram_leaves_are_named_by_task(drawn, tmp_path):
    from scipy.cluster.hierarchy import linkage

    points = np.array([[0.0], [0.1], [1.0]])
    plots.plot_dendrogram(linkage(points, "average"), ["digits", "species", "motion"], str(tmp_path / "d.png"))
    assert sorted(_ticklabels(drawn[0].axes[0])) == ["digits", "motion", "species"]


def test_side_by_side_heatmaps_share_one_scale_and_show_a_model_without_moe_layers(drawn, tmp_path):
    """Model B with more layers than A gets all its rows; the scale reaches B's largest share; a
    dense model (no MoE layer, shares ``[0, G, E]``) leaves its column empty under its own label."""
    groups = ["digits", "species"]
    share_a = np.full((1, 2, 3), 0.25)
    share_b = np.full((2, 2, 3), 0.5)
    share_b[1, 0, 2] = 0.75
    plots.plot_heatmaps_side_by_side(share_a, share_b, ["a0"], ["b0", "b1"], groups, ["A", "B"],
                                     str(tmp_path / "ab.png"))
    titles = [ax.get_title() for ax in drawn[0].axes[:4]]
    assert titles == ["A: a0", "B: b0", "", "B: b1"]
    images = [ax.images[0] for ax in drawn[0].axes[:4] if ax.images]
    assert len(images) == 3 and all(image.get_clim() == (0.0, 0.75) for image in images)
    np.testing.assert_array_equal(images[2].get_array(), share_b[1].T)

    path = str(tmp_path / "dense.png")
    assert plots.plot_heatmaps_side_by_side(share_a, np.zeros((0, 2, 3)), ["a0"], [], groups, ["moe", "dense"],
                                            path) == path
    left, right = drawn[1].axes[:2]
    assert left.get_title() == "moe: a0" and right.get_title() == "dense: no MoE layer" and not right.images
    assert left.images[0].get_clim() == (0.0, 0.25) and (tmp_path / "dense.png").stat().st_size > 0
