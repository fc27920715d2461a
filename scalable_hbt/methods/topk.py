"""Top-k queries: the k most helpful and the k most harmful training points of every test point,
streamed over the training data so that the T × n influence matrix is never held.

For each chunk of per-sample training gradients G_c the scores of its points are computed
(influence I = (1/n) G_c s_t, or RelatIF I / ‖C_δ⁻¹ g_r‖) and merged into running top-k lists;
memory is O(T·(k + c)) besides the solved test gradients s_t = C_δ⁻¹ g_t (M × T). Under
``torch.distributed`` each rank keeps the top k of its shard and the ranks' lists are merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import distributed
from ..curvature import CurvatureBackend, backend_names
from ..data import DataLike
from ..objective import Objective
from ..validation import SettingError, check_choice, check_integer
from .base import FittedCurvature, Method, MethodResult, TestSettings
from .influence import solved_test_gradients

TopK = dict[str, Tensor]
"""``helpful_index``, ``helpful_score``, ``harmful_index``, ``harmful_score``, each ``(T, k)``;
helpful: the largest scores first, harmful: the most negative first."""


def _merge(best: tuple[Tensor, Tensor] | None, scores: Tensor, index: Tensor, k: int,
           largest: bool) -> tuple[Tensor, Tensor]:
    """The k best of the running list ``best`` (scores, indices) and new ``scores`` (T, c) at ``index`` (c,)."""
    cand_s = scores if best is None else torch.cat([best[0], scores], dim=1)
    cand_i = index.expand(scores.shape[0], -1) if best is None else torch.cat(
        [best[1], index.expand(scores.shape[0], -1)], dim=1)
    top = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1, largest=largest)
    return top.values, torch.gather(cand_i, 1, top.indices)


def top_k(objective: Objective, inverse: CurvatureBackend, damping: float, test: DataLike,
          y_test: Tensor | None = None, *, k: int = 10, norms: Tensor | None = None, labels: str = "true",
          test_loss: str = "objective") -> TopK:
    """The k most helpful (largest influence) and most harmful (most negative) training points per
    test point; with ``norms`` (n,) the scores are RelatIF's I / ‖C_δ⁻¹ g_r‖."""
    S = solved_test_gradients(objective, inverse, damping, test, y_test, labels, test_loss)
    n = objective.n
    k = min(k, n)
    lists: dict[bool, tuple[Tensor, Tensor] | None] = {True: None, False: None}

    def visit(start: int, G: Tensor) -> None:
        scores = (S.T @ G.T) / n
        if norms is not None:
            scores = scores / norms[start:start + G.shape[0]]
        index = torch.arange(start, start + G.shape[0], device=scores.device)
        for largest in (True, False):
            lists[largest] = _merge(lists[largest], scores, index, k, largest)

    objective.training_chunks(visit, desc="top-k")
    out: TopK = {}
    for largest, name in ((True, "helpful"), (False, "harmful")):
        values, index = lists[largest]  # type: ignore[misc]
        if distributed.active():  # every rank holds its shard's best: merge them
            values, index = _merge_ranks(values, index, k, largest)
        out[f"{name}_index"], out[f"{name}_score"] = index, values
    return out


def _merge_ranks(values: Tensor, index: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """The k best over every rank's list (a shard shorter than k is padded with placeholders
    that never win)."""
    missing = k - values.shape[1]
    if missing > 0:
        fill = float("-inf") if largest else float("inf")
        values = torch.cat([values, values.new_full((values.shape[0], missing), fill)], dim=1)
        index = torch.cat([index, index.new_full((index.shape[0], missing), -1)], dim=1)
    all_values = distributed.all_gather_cat(values, 1)
    all_index = distributed.all_gather_cat(index, 1)
    top = torch.topk(all_values, k, dim=1, largest=largest)
    return top.values, torch.gather(all_index, 1, top.indices)


@dataclass(frozen=True)
class TopKSettings(TestSettings):
    """``k`` per list; ``score`` "influence" or "relatif" (with its ``normalizer``)."""

    k: int = 10
    score: str = "influence"
    normalizer: str | CurvatureBackend | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_integer("k", self.k, 1)
        check_choice("score", self.score, ("influence", "relatif"))
        if not (self.normalizer is None or isinstance(self.normalizer, CurvatureBackend)
                or self.normalizer in backend_names("inverse")):
            raise SettingError("normalizer", self.normalizer, f"None or one of {backend_names('inverse')}")


def _run(fitted: FittedCurvature, X: DataLike, y: Tensor | None, s: TopKSettings) -> MethodResult:
    norms = fitted.training_inverse_norms(s.normalizer) if s.score == "relatif" else None
    result = top_k(fitted.objective, fitted.inverse, fitted.damping, X, y, k=s.k, norms=norms, labels=s.labels,
                   test_loss=s.test_loss)
    return result, {"score": s.score}


def _prepare(fitted: FittedCurvature, s: TopKSettings) -> None:
    if s.score == "relatif":
        fitted.training_inverse_norms(s.normalizer)


TOP_K = Method("top_k", TopKSettings, _run, per_training_point=False, needs=frozenset({"inverse"}),
               prepare=_prepare)
