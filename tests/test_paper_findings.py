"""The paper's findings (Dawid et al. 2021, section III), each a test on a seeded run.

Every test states a finding as the paper states it, on models trained in the paper's
regime (``DemoConfig(regime="stopped")``: SGD with momentum / Adam with a decreasing learning
rate for a fixed budget, dropout on, no polish; ``damping="auto"`` for the indefinite
Hessian). A finding that does not reproduce is a strict xfail whose reason carries the
measured numbers (examples/README.md has them across seeds); it is never loosened. With
seed 0: Fig. 3's finding passes; Fig. 5's and Fig. 6's are strict xfails.

* Fig. 5 (section III C, the paper CNN, 1000 training points): every permuted (OOD) test
  point has a higher LEES than its in-distribution neighbours.
* Fig. 6 (section III D, the size-invariant CNN on 12 and 14 sites): the non-zero-RUE
  region is narrower for L = 14 than for L = 12, with the paper's threshold 5e-5 and with a
  relative one ("regardless of the chosen threshold").
* Fig. 3 (section III A, the size-invariant CNN on 12 sites): for a test point deep in
  CDW-I, RelatIF's five most helpful training points lie deeper in CDW-I than influence's.

The size-invariant models use ``DemoConfig.side_points_per_phase`` points per phase, as the
demo's size comparison. The fixtures dominate the run time (the L = 12 dense fit and the
L = 14 ARPACK + CG RUE of the GAP CNN take most of it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scalable_hbt import Toolbox
from scalable_hbt.curvature import LanczosCurvature
from scalable_hbt.apps.demo import (
    FIG3_TEST_V1,
    LEES_M,
    DemoConfig,
    TrainedModel,
    above_neighbours,
    matrix_free_toolbox,
    train_classifier,
    uncertain_region,
)
from scalable_hbt.physics import (
    GAP_CNN_RECIPE,
    PAPER_CNN_RECIPE,
    PAPER_OOD_FRACTION,
    PaperCNN,
    PhaseDataset,
    SizeInvariantCNN,
    evaluation_set,
    training_set,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SEED = 0
CFG = DemoConfig(seed=SEED, progress=False)
GAP_POINTS_PER_PHASE = CFG.side_points_per_phase


@pytest.fixture(scope="module")
def paper_cnn() -> TrainedModel:
    """The paper CNN on the paper's 1000 L = 12 training points (Fig. 5's model)."""
    train = training_set(12, progress=False)
    return train_classifier(PaperCNN, train, PAPER_CNN_RECIPE, seed=SEED, progress=False)


@pytest.fixture(scope="module")
def gap_cnns() -> dict[int, tuple[PhaseDataset, PhaseDataset, TrainedModel, Toolbox]]:
    """The size-invariant CNN trained on L = 12 and on L = 14 (Figs. 3 and 6): per L the
    training set, the reference test set, the trained model and its fitted Toolbox
    (``damping="auto"``). L = 12 gets the dense oracle (RelatIF needs H_δ⁻¹ g_r for every
    training point); L = 14 gets the demo's CG toolbox (exact too, at rtol 1e-10, and cheaper
    there than 1675 HVPs on 3432-long inputs) without eigenpairs (no LEES here); its λ_min for
    ``damping="auto"`` comes from ARPACK."""
    out = {}
    for L in (12, 14):
        train = training_set(L, GAP_POINTS_PER_PHASE, progress=False)
        trained = train_classifier(SizeInvariantCNN, train, GAP_CNN_RECIPE, seed=SEED, progress=False)
        obj = trained.build_objective(CFG.progress)
        if L == 12:
            tb = Toolbox(obj, damping="auto", inverse="dense", eigen="dense")
        else:
            tb = matrix_free_toolbox(obj, CFG, eigenpairs=False)
        out[L] = (train, evaluation_set(L, progress=False), trained, tb.fit())
    return out


@pytest.mark.xfail(strict=True, reason=(
    "does not reproduce: seed 0, m = 12: the permuted points at V1 = 0.16, 0.55, 0.80 (LL) stand "
    "above their in-distribution neighbours, those at V1 = 3.58, 4.06 (CDW-I) do not (LEES at the "
    "CDW-I floor); AUROC 0.65 (seeds 1, 2: 4/5 above, AUROC 0.71, 0.88; examples/README.md)"))
def test_every_permuted_point_has_a_higher_lees_than_its_neighbours(paper_cnn):
    """Fig. 5: "the LEES perfectly highlights each of them, being significantly larger for all
    OOD test points than its neighbors" (m = 12, predicted labels, as the paper)."""
    test_ood = evaluation_set(12, ood_fraction=PAPER_OOD_FRACTION, seed=SEED, progress=False)
    X, _ = paper_cnn.tensors(test_ood)
    # LEES needs only the top-m eigenvectors; δ enters no LEES formula
    tb = Toolbox(paper_cnn.build_objective(CFG.progress), damping=1.0, inverse="cg", cache_graphs=True,
                 eigen=LanczosCurvature(m=LEES_M, tol=1e-12, max_iter=300, seed=SEED))
    lees = tb.extrapolation_score(X, m=LEES_M).numpy()
    above = above_neighbours(lees, test_ood.ood)
    assert test_ood.ood.sum() == 5
    assert above.all(), (f"OOD points at V1 = {np.round(test_ood.v1[test_ood.ood], 2).tolist()}: "
                         f"above both in-distribution neighbours {above.tolist()}")


@pytest.fixture(scope="module")
def rue_regions(gap_cnns) -> dict[int, dict]:
    """``uncertain_region`` of each L's RUE on its reference test set (predicted labels,
    δ' = δ + 1, 50 bootstrap samples, as the paper's Fig. 6)."""
    out = {}
    for L, (_, test, trained, tb) in gap_cnns.items():
        X, _ = trained.tensors(test)
        out[L] = uncertain_region(test.v1, tb.rue(X, n_bootstrap=50, seed=SEED, labels="predicted").numpy())
    return out


@pytest.mark.xfail(strict=True, reason=(
    "does not reproduce: seed 0, RUE > 5e-5 for V1 in [0.60, 1.91] (width 1.31) at L = 12 and "
    "[0.50, 2.46] (width 1.95) at L = 14; > 5 % of max in [1.02, 1.49] (0.47) vs [1.16, 1.91] (0.76) "
    "(paper: [1, 3.6] vs [1, 2.8]); at the paper's 500 points per phase too: widths 0.64 (L = 12) vs "
    "1.11 (L = 14) (examples/README.md)"))
@pytest.mark.parametrize("rule", ["paper_5e-5", "relative_5pct"])
def test_uncertain_region_is_narrower_for_14_sites(rue_regions, rule):
    """Fig. 6: "the non-zero RUE regime is always narrower in the 14-site case, regardless of
    the chosen threshold" (the paper's 5e-5, and 5 % of the largest RUE)."""
    regions = {L: rue_regions[L][rule] for L in (12, 14)}
    assert regions[14]["width"] < regions[12]["width"], f"RUE > threshold regions: {regions}"


def test_relatif_follows_a_deep_cdw_point_deeper_than_influence(gap_cnns):
    """Fig. 3 (c), (f): for a test point deep in CDW-I, "the five most helpful training points
    [by RelatIF] follow the test point much deeper to the CDW-I phase" than influence's."""
    train, test, trained, tb = gap_cnns[12]
    X, y = trained.tensors(test)
    i = int(np.argmin(np.abs(test.v1 - FIG3_TEST_V1["deep_CDW"])))
    top5 = {name: np.argsort(values.numpy()[0])[::-1][:5]
            for name, values in (("influence", tb.influence(X[i:i + 1], y[i:i + 1])),
                                 ("relatif", tb.relatif(X[i:i + 1], y[i:i + 1])))}
    depth = {name: float(train.v1[idx].mean()) for name, idx in top5.items()}
    assert depth["relatif"] > depth["influence"], f"mean V1 of the five most helpful: {depth}"
