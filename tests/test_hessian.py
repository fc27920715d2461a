"""The Hessian operator and the dense oracle against torch.autograd.functional.hessian."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from scalable_hbt import DenseCurvature, HessianOperator, Objective
from conftest import DEVICES, Flat, brute_force_hessian, brute_force_losses, make_problem, training_tensors

MODES = ["forward-over-reverse", "reverse-over-reverse"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", MODES)
def test_hvp_and_matmat_equal_brute_force(kind, mode, device):
    obj = make_problem(kind, device=device)
    H = brute_force_hessian(obj)
    op = HessianOperator(obj, mode=mode, max_vectors=3)
    V = torch.randn(obj.num_params, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    torch.testing.assert_close(op.matvec(V[:, 0]), H @ V[:, 0], rtol=0, atol=1e-10 * H.abs().max().item())
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=0, atol=1e-10 * H.abs().max().item())
    assert op.num_hvps == 8


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_forward_over_reverse_equals_reverse_over_reverse(kind):
    obj = make_problem(kind)
    V = torch.randn(obj.num_params, 5, dtype=torch.float64)
    fwd = HessianOperator(obj, mode="forward-over-reverse").matmat(V)
    rev = HessianOperator(obj, mode="reverse-over-reverse").matmat(V)
    torch.testing.assert_close(fwd, rev, rtol=1e-12, atol=1e-12)


class _TanhWithoutJvp(torch.autograd.Function):
    """tanh with a backward but no jvp: forward-mode AD is unavailable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _NoJvpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(_TanhWithoutJvp.apply(self.a(x)))


def test_automatic_fallback_to_reverse_over_reverse():
    torch.manual_seed(0)
    ref = make_problem("mlp")
    model = _NoJvpNet()
    model.a.load_state_dict(ref.model[0].state_dict())
    model.b.load_state_dict(ref.model[2].state_dict())
    obj = Objective(model, "cross_entropy", ref.train, weight_decay=ref.weight_decay, dtype=torch.float64,
                    batch_size=16, progress=False)
    op = HessianOperator(obj, mode="auto")
    v = torch.randn(obj.num_params, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="reverse-over-reverse"):
        hv = op.matvec(v)
    assert op.mode == "reverse-over-reverse"
    torch.testing.assert_close(hv, brute_force_hessian(ref) @ v, rtol=0, atol=1e-10)
    with pytest.raises((RuntimeError, NotImplementedError)):
        HessianOperator(obj, mode="forward-over-reverse").matvec(v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_dense_hessian_equals_brute_force(kind, device):
    obj = make_problem(kind, device=device)
    H = brute_force_hessian(obj)
    dense = DenseCurvature(chunk=4).fit(HessianOperator(obj))
    Q, lam = dense.eigenvectors, dense.eigenvalues
    torch.testing.assert_close(Q @ torch.diag(lam) @ Q.T, H, rtol=0, atol=1e-10 * H.abs().max().item())
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(H), rtol=0, atol=1e-10)
    assert dense.diagnostics["relative_asymmetry"] < 1e-12


def test_chunk_and_batch_size_do_not_change_results():
    M = make_problem("cnn").num_params
    ref = HessianOperator(make_problem("cnn", batch_size=40)).dense(chunk=M)
    H = brute_force_hessian(make_problem("cnn"))
    torch.testing.assert_close(ref, H, rtol=0, atol=1e-10 * H.abs().max().item())
    for batch_size in (1, 7, 16):
        for chunk in (1, 5, 64):
            H = HessianOperator(make_problem("cnn", batch_size=batch_size)).dense(chunk=chunk)
            torch.testing.assert_close(H, ref, rtol=0, atol=1e-12)
    assert ref.shape == (M, M)


def test_dense_assembly_uses_batched_passes():
    obj = make_problem("mlp")
    op = HessianOperator(obj, max_vectors=8)
    passes = []
    original = obj.batches

    def counting(*args, **kwargs):
        passes.append(1)
        return original(*args, **kwargs)

    obj.batches = counting
    op.dense(chunk=8)
    assert len(passes) == -(-obj.num_params // 8)  # ⌈M / k⌉ passes, not M


def test_minibatch_product_is_the_subset_hessian():
    obj = make_problem("mlp")
    idx = torch.tensor([3, 17, 5, 30])
    X, y = training_tensors(obj)
    V = torch.randn(obj.num_params, 3, dtype=torch.float64)
    op = HessianOperator(obj)
    H_sub = brute_force_hessian(obj, data=(X[idx], y[idx]))  # (1/4) Σ_{i ∈ idx} ∇²ℓ_i
    torch.testing.assert_close(op.minibatch_matmat(V, idx), H_sub @ V, rtol=0, atol=1e-10)
    assert op.num_hvps == pytest.approx(3 * 4 / obj.n)


def test_scipy_linear_operator_adapter():
    obj = make_problem("mlp")
    H = brute_force_hessian(obj).numpy()
    lin = HessianOperator(obj).to_scipy(damping=0.3)
    X = np.random.default_rng(0).standard_normal((obj.num_params, 4))
    np.testing.assert_allclose(lin.matvec(X[:, 0]), (H + 0.3 * np.eye(len(H))) @ X[:, 0], atol=1e-10)
    np.testing.assert_allclose(lin @ X, (H + 0.3 * np.eye(len(H))) @ X, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cupy_linear_operator_adapter():
    cupy = pytest.importorskip("cupy")
    obj = make_problem("mlp", device="cuda")
    H = brute_force_hessian(obj)
    lin = HessianOperator(obj).to_cupy(damping=0.3)
    x = cupy.random.standard_normal(obj.num_params)
    expected = (H + 0.3 * torch.eye(len(H), device="cuda", dtype=H.dtype)) @ torch.from_dlpack(x)
    cupy.testing.assert_allclose(lin.matvec(x), cupy.from_dlpack(expected), atol=1e-10)


def test_matvec_warns_nothing_for_plain_models():
    obj = make_problem("cnn")
    v = torch.ones(obj.num_params, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        hv = HessianOperator(obj).matvec(v)
    torch.testing.assert_close(hv, brute_force_hessian(obj) @ v, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_cached_graphs_give_the_same_products(kind):
    obj = make_problem(kind)
    op = HessianOperator(obj)
    V = torch.randn(obj.num_params, 4, dtype=torch.float64)
    ref = op.matmat(V)
    H = brute_force_hessian(obj)
    torch.testing.assert_close(ref, H @ V, rtol=0, atol=1e-10 * H.abs().max().item())
    with op.cached_graphs():
        first, second = op.matmat(V), op.matmat(2 * V)
        assert len(op._graphs) == -(-obj.n // obj.batch_size)
    assert op._graphs is None
    torch.testing.assert_close(first, ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(second, 2 * ref, rtol=0, atol=1e-13)



def test_operator_level_graph_cache_persists_and_matches():
    """``cache_graphs=True`` keeps the graphs across products (and across an inner
    ``cached_graphs`` block, which must not drop them) and changes no product."""
    obj = make_problem("cnn")
    V = torch.randn(obj.num_params, 3, dtype=torch.float64)
    ref = HessianOperator(obj).matmat(V)
    H = brute_force_hessian(obj)
    torch.testing.assert_close(ref, H @ V, rtol=0, atol=1e-10 * H.abs().max().item())
    op = HessianOperator(obj, cache_graphs=True)
    first = op.matmat(V)
    graphs = dict(op._graphs)
    assert len(graphs) == -(-obj.n // obj.batch_size)
    with op.cached_graphs():
        second = op.matmat(V)
    assert op._graphs is not None and all(op._graphs[k] is graphs[k] for k in graphs)  # reused, not rebuilt
    torch.testing.assert_close(first, ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(second, ref, rtol=0, atol=1e-13)

def test_regression_loss_hvp_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 2, generator=g, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    obj = Objective(model, "mse", (X, Y), weight_decay=0.1, dtype=torch.float64, batch_size=7, progress=False)
    V = torch.randn(obj.num_params, 3, dtype=torch.float64, generator=g)
    H = brute_force_hessian(obj, data=(X, Y))
    torch.testing.assert_close(HessianOperator(obj).matmat(V), H @ V, rtol=0, atol=1e-10)



class _OrderNet(nn.Module):
    """Parameters registered in an order that differs from the order of use, a frozen weight
    between trainable ones, and a bare parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.second = nn.Linear(3, 2)
        self.first = nn.Linear(4, 3)
        self.middle = nn.Linear(3, 3)
        self.middle.weight.requires_grad_(False)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x):
        return self.second(torch.tanh(self.middle(torch.tanh(self.first(x)) * self.scale)))


def test_flatten_order_matches_named_parameters():
    """θ is the trainable parameters flattened in ``named_parameters()`` order (DESIGN §1):
    the library's names, θ̃, ``unflatten`` and ``flatten`` agree with our own flattening of the
    caller's module, and the functional forward, losses and Hessian with the module's own."""
    torch.manual_seed(0)
    model = _OrderNet().double()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (12,), generator=g)
    obj = Objective(model, "cross_entropy", (X, y), weight_decay=0.1, dtype=torch.float64, batch_size=5,
                    progress=False)
    flat = Flat(model)  # the caller's module, not the Objective's copy
    # a module's own parameters come before its children's, children in registration order
    assert flat.names == ["scale", "second.weight", "second.bias", "first.weight", "first.bias", "middle.bias"]
    assert obj.param_names == flat.names and obj.num_params == flat.M == 6 + 2 + 12 + 3 + 3 + 3
    assert torch.equal(obj.theta, flat.theta)
    v = torch.arange(flat.M, dtype=torch.float64)  # every entry distinct: any permutation shows
    parts = obj.unflatten(v)
    assert list(parts) == flat.names
    for name, ref in flat.split(v).items():
        assert torch.equal(parts[name], ref), name
    assert torch.equal(obj.flatten(flat.split(v)), v)
    with torch.no_grad():
        torch.testing.assert_close(obj.forward(obj.theta, X), model(X), rtol=0, atol=1e-14)
    torch.testing.assert_close(obj.per_sample_losses(X, y), brute_force_losses(obj, X, y), rtol=0, atol=1e-14)
    H = brute_force_hessian(obj, data=(X, y), model=model)
    torch.testing.assert_close(HessianOperator(obj).dense(), H, rtol=0, atol=1e-12)
