"""Self-influence and streamed top-k queries against explicit references built from the raw module:
per-sample gradients one sample at a time with torch.autograd, the Hessian by
torch.autograd.functional.hessian of the loss written out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from scalable_hbt import Toolbox
from scalable_hbt.apps.jobs import load_job, read_results, run_job
from conftest import make_problem
from jobs_fixture import write_job, write_problem


def _flat_model(obj):
    """The module as a function of a flat vector assembled here (not the library's unflatten)."""
    named = [(k, p.detach().to(torch.float64)) for k, p in obj.model.named_parameters()]
    theta = torch.cat([p.reshape(-1) for _, p in named])
    sizes = [p.numel() for _, p in named]

    def f(t, x):
        params = {k: part.view(p.shape) for (k, p), part in zip(named, torch.split(t, sizes))}
        return functional_call(obj.model, params, (x,))

    return theta, f


def _raw_hessian_and_gradients(obj):
    theta, f = _flat_model(obj)
    X, y = obj.train.take(range(obj.n))
    wd = obj.weight_decay

    def L(t):
        return F.cross_entropy(f(t, X), y) + 0.5 * wd * t.square().sum()

    H = torch.autograd.functional.hessian(L, theta)
    G = []
    for xi, yi in zip(X, y):
        t = theta.clone().requires_grad_(True)
        value = F.cross_entropy(f(t, xi[None]), yi[None]) + 0.5 * wd * t.square().sum()
        G.append(torch.autograd.grad(value, t)[0])
    return H, torch.stack(G)


@pytest.mark.parametrize("inverse", ["dense", "cg", "kfac"])
def test_self_influence_is_the_diagonal_of_the_influence_of_the_training_set_on_itself(inverse):
    obj = make_problem("mlp")
    H, G = _raw_hessian_and_gradients(obj)
    damping = abs(min(torch.linalg.eigvalsh(H)[0].item(), 0.0)) + 0.1
    reference = (G * torch.linalg.solve(H + damping * torch.eye(len(H), dtype=H.dtype), G.T).T).sum(1) / obj.n
    tb = Toolbox(obj, damping=damping, inverse="dense" if inverse == "kfac" else inverse, eigen="dense")
    if inverse == "kfac":
        # K-FAC's quadratic form in its eigenbasis equals gᵀ(Ĥ + δI)⁻¹g of its own dense approximation
        kfac = tb.inverse_backend("kfac")
        Hk = kfac.dense_matrix()
        expected = (G * torch.linalg.solve(Hk + damping * torch.eye(len(Hk), dtype=Hk.dtype), G.T).T).sum(1) / obj.n
        torch.testing.assert_close(tb.self_influence(backend="kfac"), expected, rtol=1e-9, atol=1e-13)
        return
    got = tb.self_influence()
    torch.testing.assert_close(got, reference, rtol=1e-8, atol=1e-13)
    assert (got > 0).all()


def test_top_k_equals_sorting_the_full_influence_matrix():
    obj = make_problem("cnn", n=40, batch_size=7)  # several chunks, so the merge across chunks is exercised
    H, G = _raw_hessian_and_gradients(obj)
    damping = abs(min(torch.linalg.eigvalsh(H)[0].item(), 0.0)) + 0.1
    Xt, yt = obj.train.take(range(5))
    tb = Toolbox(obj, damping=damping, inverse="dense", eigen="dense")
    Gt = G[:5]
    I = Gt @ torch.linalg.solve(H + damping * torch.eye(len(H), dtype=H.dtype), G.T) / obj.n  # (5, n)
    got = tb.top_k(Xt, yt, k=4)
    order = torch.argsort(I, dim=1, descending=True)
    torch.testing.assert_close(got["helpful_index"], order[:, :4])
    torch.testing.assert_close(got["harmful_index"], torch.flip(order, [1])[:, :4])
    torch.testing.assert_close(got["helpful_score"], torch.gather(I, 1, order[:, :4]), rtol=1e-8, atol=1e-14)
    rel = tb.top_k(Xt, yt, k=3, score="relatif")
    R = I / torch.linalg.solve(H + damping * torch.eye(len(H), dtype=H.dtype), G.T).norm(dim=0)
    torch.testing.assert_close(rel["helpful_index"], torch.argsort(R, dim=1, descending=True)[:, :3])
    with pytest.raises(ValueError, match="k = 0: expected an integer ≥ 1"):
        tb.top_k(Xt, yt, k=0)


def test_self_influence_and_top_k_in_a_job(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    write_problem(tmp_path)
    job = write_job(tmp_path, methods='["self_influence", "top_k", "influence"]')
    job.write_text(job.read_text().replace("[output]", "self_influence = { backend = \"ekfac\" }\n"
                                                       "top_k = { k = 3 }\n\n[output]"))
    run_job(load_job(job), echo=lambda *_: None, progress=False)
    si = read_results(tmp_path / "out", "self_influence")
    top = read_results(tmp_path / "out", "top_k")
    infl = read_results(tmp_path / "out", "influence")
    assert si.shape == (60,) and (si > 0).all()
    assert top["helpful_index"].shape == (24, 3)
    np.testing.assert_array_equal(top["helpful_index"], np.argsort(-infl, axis=1, kind="stable")[:, :3])
