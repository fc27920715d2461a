"""``hbt demo``: figure functions, metrics, CLI parsing, and a tiny end-to-end run."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from scalable_hbt.apps.cli import build_parser  # noqa: E402
from scalable_hbt.apps.demo import (  # noqa: E402
    FIGURES,
    QUICK_FIGURES,
    DemoConfig,
    above_neighbours,
    format_summary,
    parse_figures,
    run_demo,
    size_experiment,
    stand_out,
    uncertain_region,
)
from scalable_hbt.metrics import agreement, auroc, resolved_mask  # noqa: E402
from scalable_hbt.physics import figures  # noqa: E402


def _points_with_color(ax, color: str) -> np.ndarray:
    """Offsets of all scatter points drawn on ``ax`` in face colour ``color``."""
    want = np.array(to_rgba(color))
    found = [c.get_offsets() for c in ax.collections
             if len(c.get_facecolors()) and np.allclose(c.get_facecolors()[0], want)]
    return np.concatenate(found) if found else np.empty((0, 2))


@pytest.fixture
def synthetic():
    v1 = np.concatenate([np.linspace(0, 1, 20), np.linspace(1.01, 40, 20)])
    rng = np.random.default_rng(0)
    return v1, rng.normal(size=(3, 40))


# --------------------------------------------------------------------------- figures
def test_top_k_orders_helpful_and_harmful():
    helpful, harmful = figures.top_k(np.array([0.1, 5.0, -3.0, 2.0, -1.0, 0.0]), k=2)
    assert helpful.tolist() == [1, 3] and harmful.tolist() == [2, 4]


def test_fig3_axes_and_marked_points(synthetic):
    v1, infl = synthetic
    relatif = infl[:, ::-1].copy()
    fig = figures.influence_vs_relatif_figure(v1, infl, relatif, [0.1, 1.0, 30.0], k=5)
    assert isinstance(fig, Figure)
    axes = np.array(fig.axes).reshape(2, 3)
    for col in range(3):
        for row, values in enumerate((infl[col], relatif[col])):
            ax = axes[row, col]
            assert ax.get_xscale() == "symlog"
            green = _points_with_color(ax, figures.HELPFUL_COLOR)
            red = _points_with_color(ax, figures.HARMFUL_COLOR)
            helpful, harmful = figures.top_k(values, 5)
            assert sorted(green[:, 1]) == sorted(values[helpful])
            assert sorted(red[:, 1]) == sorted(values[harmful])
            # the orange vertical line sits at the test point's V1
            lines = [ln for ln in ax.get_lines() if ln.get_color() == figures.TEST_COLOR]
            assert lines and lines[0].get_xdata()[0] == [0.1, 1.0, 30.0][col]
    assert axes[0, 0].get_ylabel().startswith("influence") and axes[1, 0].get_ylabel().startswith("RelatIF")


def test_fig3_rejects_mismatched_shapes(synthetic):
    v1, infl = synthetic
    with pytest.raises(ValueError, match="shapes disagree"):
        figures.influence_vs_relatif_figure(v1, infl, infl[:2], [0.1, 1.0, 30.0])


def test_fig4_marks_flipped_points(synthetic):
    v1, infl = synthetic
    flipped = np.zeros(40, dtype=bool)
    flipped[[3, 25, 30]] = True
    panel = figures.SignPanel("imbalanced", v1, infl[0], flipped, 1.02)
    fig = figures.sign_anomaly_figure([panel, panel])
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    assert ax.get_yscale() == "symlog"
    ringed = [c for c in ax.collections if c.get_label() == "flipped global sign"]
    assert len(ringed) == 1
    np.testing.assert_allclose(ringed[0].get_offsets(), np.column_stack([v1[flipped], infl[0][flipped]]))


def test_fig5_marks_ood_points():
    v1 = np.linspace(0.05, 30, 12)
    ood = np.zeros(12, dtype=bool)
    ood[[2, 7]] = True
    fig = figures.lees_figure(v1, np.linspace(0, 1, 12), np.arange(12.0), ood, auroc=0.75)
    ax = fig.axes[0]
    red = [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_color() == figures.HARMFUL_COLOR]
    assert sorted(red) == sorted(v1[ood])
    triangles = [c for c in ax.collections if c.get_label() == "LEES (scaled)"][0]
    assert triangles.get_offsets()[:, 1].max() == pytest.approx(1.0) and ax.get_yscale() == "log"
    assert "0.750" in ax.get_title()


def test_fig6_error_bars_and_order_parameter():
    v1 = np.linspace(0.05, 30, 10)
    rue = np.array([0, 0, 1e-4, 3e-4, 2e-4, 1e-6, 0, 0, 0, 0.0])
    panels = [figures.RUEPanel("L = 12", v1, rue, np.linspace(0, 1, 10)),
              figures.RUEPanel("L = 14", v1, rue / 2, np.linspace(0, 1, 10) ** 2)]
    fig = figures.rue_figure(panels, threshold=5e-5)
    axes = np.array(fig.axes).reshape(2, 3)
    assert axes[0, 2].get_ylabel() == "$O_\\mathrm{CDW-I}$" and not axes[1, 2].get_visible()
    assert axes[1, 0].get_yscale() == "log"
    legend = [t.get_text() for t in axes[0, 0].get_legend().get_texts()]
    assert any(f"[{v1[2]:.2f}, {v1[4]:.2f}]" in t for t in legend)  # the shaded RUE > threshold region


def test_figures_save_as_png(tmp_path, synthetic):
    v1, infl = synthetic
    fig = figures.influence_vs_relatif_figure(v1, infl[:1], infl[:1], [0.5])
    fig.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- metrics
def test_auroc_hand_example():
    # positives 0.25 (rank 3) and 0.9 (rank 5): (8 − 3) / (2·3) = 5/6; pairwise: 0.25 beats 0.1 and
    # 0.2 but not 0.3, 0.9 beats all three negatives -> 5 of 6 pairs
    assert auroc(np.array([0.1, 0.25, 0.2, 0.3, 0.9]), np.array([0, 1, 0, 0, 1], bool)) == pytest.approx(5 / 6)
    assert auroc(np.array([1.0, 2.0, 3.0]), np.array([0, 0, 1], bool)) == 1.0
    assert auroc(np.array([1.0, 1.0]), np.array([0, 1], bool)) == 0.5  # a tie counts one half
    with pytest.raises(ValueError, match="positive and one negative"):
        auroc(np.ones(3), np.zeros(3, bool))


def test_agreement_and_resolved_mask():
    exact = np.array([1.0, 1.0, 1.0 + 1e-12, 2.0, 5.0, -3.0])
    assert resolved_mask(exact).tolist() == [False, False, False, True, True, True]
    same = agreement(exact, exact.copy())
    assert same["pearson"] == pytest.approx(1.0) and same["max_rel_error"] == 0.0 and same["n_resolved"] == 3
    off = agreement(exact[None], (exact * 1.01)[None])
    assert off["max_rel_error"] == pytest.approx(0.01)


def test_above_neighbours():
    values = np.array([5.0, 1.0, 3.0, 2.0, 2.5, 0.1, 2.6, 9.0, 0.5])
    marked = np.array([1, 0, 1, 0, 1, 1, 0, 0, 1], bool)
    # compared with the nearest unmarked point on each side, skipping marked ones:
    # 5 > 1 (start); 3 > 1, 2; 2.5 > 2 but not > 2.6; 0.1 < 2; 0.5 < 9 (end)
    assert above_neighbours(values, marked).tolist() == [True, True, False, False, False]
    assert above_neighbours(values, np.zeros(9, bool)).size == 0


def test_uncertain_region_paper_threshold_and_relative():
    v1 = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 10.0])
    rue = np.array([1e-6, 1e-4, 1e-2, 6e-5, 4e-4, 1e-7])
    region = uncertain_region(v1, rue)
    assert region["paper_5e-5"]["v1_range"] == [1.0, 3.0] and region["paper_5e-5"]["width"] == 2.0
    assert region["relative_5pct"]["threshold"] == pytest.approx(5e-4)
    assert region["relative_5pct"]["v1_range"] == [1.5, 1.5] and region["relative_5pct"]["width"] == 0.0
    nothing = uncertain_region(v1, np.zeros(6))
    assert nothing["paper_5e-5"]["v1_range"] is None and nothing["paper_5e-5"]["width"] == 0.0


def test_stand_out_flags_off_curve_points():
    v1 = np.linspace(0, 10, 50)
    values = np.sin(v1)
    marked = np.zeros(50, dtype=bool)
    marked[[10, 30]] = True
    values[marked] += 3.0
    off = stand_out(v1, values, marked)
    assert set(np.argsort(off)[::-1][:2]) == {10, 30}


# --------------------------------------------------------------------------- CLI
def test_parse_figures():
    assert parse_figures("all") == FIGURES
    assert parse_figures("none") == ()
    assert parse_figures("fig5, fig3,fig5") == ("fig5", "fig3")
    with pytest.raises(ValueError, match="fig7"):
        parse_figures("fig3,fig7")


def test_cli_figures_option(capsys):
    parser = build_parser()
    args = parser.parse_args(["demo", "--quick", "--figures", "fig3,fig6", "--out", "x", "--seed", "2"])
    assert args.figures == ("fig3", "fig6") and args.quick and args.seed == 2 and args.out == "x"
    assert not args.size_comparison and parser.parse_args(["demo", "--size-comparison"]).size_comparison
    assert parser.parse_args(["demo"]).figures is None
    assert parser.parse_args(["demo"]).regime == "stopped"
    assert parser.parse_args(["demo", "--regime", "tight"]).regime == "tight"
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--figures", "fig9"])
    assert "fig9" in capsys.readouterr().err
    assert parser.parse_args(["demo", "--size-points", "500"]).size_points == 500
    assert parser.parse_args(["demo"]).size_points is None
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--size-points", "1"])
    assert "integer ≥ 2" in capsys.readouterr().err


def test_cli_defaults_are_demo_config_defaults():
    """The parser takes every default from DemoConfig: no options, the default configuration."""
    from scalable_hbt.apps.cli import _demo_config

    assert _demo_config(build_parser().parse_args(["demo"])) == DemoConfig()
    cfg = _demo_config(build_parser().parse_args(["demo", "--no-progress", "--size-points", "7", "--out", "x"]))
    assert cfg == DemoConfig(progress=False, size_points_per_phase=7, out="x")


def test_cli_parser_does_not_load_the_demo():
    """Every ``hbt`` call builds the demo's options from DemoConfig; that must not import the
    demo's computing modules, matplotlib or the physics data stack."""
    code = ("import sys; from scalable_hbt.apps.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('matplotlib', 'scalable_hbt.physics', "
            "'scalable_hbt.apps.demo.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['scalable_hbt.apps.demo.config']"


def test_config_defaults():
    assert DemoConfig(quick=True).selected_figures == QUICK_FIGURES
    assert DemoConfig().selected_figures == FIGURES
    assert DemoConfig(quick=True).points_per_phase == 100 and DemoConfig().points_per_phase == 500
    stopped, tight = DemoConfig(), DemoConfig(regime="tight")
    assert stopped.recipe("paper").optimizer == "sgd" and stopped.recipe("paper").lbfgs_iterations == 0
    assert stopped.recipe("gap").lbfgs_iterations == 0 and tight.recipe("paper").lbfgs_iterations > 0
    assert stopped.recipe("sign") == tight.recipe("sign") and stopped.recipe("sign").lbfgs_iterations > 0
    # the same number of SGD steps on the full and the quick training set
    assert stopped.recipe("paper").epochs(1000) == 100 and stopped.recipe("paper").epochs(200) == 500
    with pytest.raises(ValueError, match="regime"):
        DemoConfig(regime="loose")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size_points_per_phase"):
        DemoConfig(size_points_per_phase=1)


# --------------------------------------------------------------------------- end to end
# The tiny end-to-end runs raise no warning: every warning (a solver that did not converge,
# a deprecation, a numerical problem) fails them. A warning that becomes expected gets its
# own "ignore:<message>:<Category>" filter after "error", with a comment saying why.
@pytest.mark.filterwarnings("error")
def test_run_demo_tiny(tmp_path, caplog):
    """A tiny run (20 training points per phase): the table, report and PNGs are produced, and
    the stage timings go to the ``scalable_hbt`` logger at INFO level."""
    cfg = DemoConfig(out=tmp_path, quick=True, progress=False, n_per_phase=20, epochs=5,
                     figures=("fig3", "fig5", "fig6"))
    caplog.set_level(logging.INFO, logger="scalable_hbt")
    report = run_demo(cfg)
    timed = [r.getMessage() for r in caplog.records if r.name == "scalable_hbt" and r.levelno == logging.INFO]
    assert any(m.startswith("training: ") and m.endswith(" s") for m in timed), timed
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["n_train"] == 40 and saved["num_params"] == 740
    backends = {(r["method"], r["backend"]) for r in saved["comparison"]}
    assert {("influence", "cg"), ("influence", "lissa"), ("relatif", "cg + ekfac normalizer"),
            ("rue_bootstrap", "cg"), ("lees", "lanczos")} <= backends
    for r in saved["comparison"]:
        if r["backend"] in ("cg", "lanczos"):
            assert r["max_rel_error"] < 1e-5, r
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "fig3_influence_vs_relatif.png", "fig5_lees_ood.png", "fig6_rue.png"]
    assert "influence" in format_summary(report)


@pytest.mark.filterwarnings("error")
def test_size_comparison_tiny():
    """Fig. 6 (a)-(b) at 3 points per phase and one epoch: both sizes trained on the requested
    number of points, RUE finite and non-negative on each reference test set."""
    cfg = DemoConfig(progress=False, size_points_per_phase=3, epochs=1)
    out = size_experiment(cfg)
    assert set(out) == {"12", "14"}
    for entry in out.values():
        rue = np.array(entry["rue"])
        assert entry["n_train"] == 6 and rue.shape == (50,) and np.isfinite(rue).all() and (rue >= 0).all()
        assert set(entry["uncertain_region"]) == {"paper_5e-5", "relative_5pct"}
