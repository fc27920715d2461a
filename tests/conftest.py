"""Shared fixtures: tiny float64 models, and brute-force references that are independent of
the library.

The references below never call the library's loss, forward, flattening or regulariser
(``Objective.loss``, ``Objective.forward``, ``Objective.unflatten``/``flatten``,
``Objective.regulariser``, ``Objective.theta``): they take the raw ``nn.Module`` (the
Objective's own deep copy, ``obj.model``, which holds θ̃), flatten its trainable
``named_parameters()`` themselves, evaluate it with ``torch.func.functional_call``, write
the losses and the regulariser (wd/2)‖θ‖² out, and differentiate with
``torch.autograd``. The training tensors are the ones the test built (recorded by
``make_problem``), not what the Objective's data source hands back.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from scalable_hbt import Objective

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")])]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module on one intra-op thread. Modules that train a network and then state
    measured properties of it use this: float64 reductions round differently with 1 and 2
    threads, a few hundred optimiser steps amplify that into a different trained model, and
    the measurements would then depend on the machine's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def tiny_cnn() -> nn.Module:
    """Conv1d → MaxPool1d → ReLU → Conv1d → ReLU → Linear, on inputs of shape (1, 16)."""
    return nn.Sequential(
        nn.Conv1d(1, 3, kernel_size=5, padding=1), nn.MaxPool1d(2), nn.ReLU(),
        nn.Conv1d(3, 2, kernel_size=3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 5, 2),
    )


# The training tensors each make_problem objective was built from (what the brute force reads).
_RAW_DATA: "weakref.WeakKeyDictionary[Objective, tuple[Tensor, Tensor]]" = weakref.WeakKeyDictionary()


def make_problem(kind: str, n: int = 40, seed: int = 0, device: str = "cpu", weight_decay: float = 1e-2,
                 batch_size: int = 16) -> Objective:
    """A float64 objective on random data: ``kind`` is "mlp" (3 classes) or "cnn" (2 classes)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        model, X = tiny_mlp(), torch.randn(n, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=gen)
    elif kind == "cnn":
        model, X = tiny_cnn(), torch.randn(n, 1, 16, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 2, (n,), generator=gen)
    else:
        raise ValueError(kind)
    obj = Objective(model, "cross_entropy", (X, y), weight_decay=weight_decay, batch_size=batch_size,
                    device=device, dtype=torch.float64, progress=False)
    _RAW_DATA[obj] = (X, y)
    return obj


def register_data(obj: Objective, X: Tensor, y: Tensor) -> Objective:
    """Record the tensors ``obj`` was built from, for the brute-force references."""
    _RAW_DATA[obj] = (X, y)
    return obj


# --------------------------------------------------------------------------- independent pieces
def ref_cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """−log softmax(out)_y written out, per sample: logsumexp(out) − out_y."""
    return torch.logsumexp(out, dim=1) - out.gather(1, y.long().unsqueeze(1)).squeeze(1)


def ref_mse(out: Tensor, y: Tensor) -> Tensor:
    """mean over output components of (out − y)², per sample."""
    return (out - y).square().reshape(out.shape[0], -1).mean(dim=1)


REF_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"cross_entropy": ref_cross_entropy, "mse": ref_mse}


def ref_loss(obj: Objective) -> Callable[[Tensor, Tensor], Tensor]:
    """Our own per-sample loss for the loss ``obj`` was built with (by name only)."""
    if obj.loss.name not in REF_LOSSES:
        raise NotImplementedError(f"no independent reference for the loss {obj.loss.name!r}")
    return REF_LOSSES[obj.loss.name]


class Flat:
    """Our own flat view of a module's trainable parameters, in ``named_parameters()`` order."""

    def __init__(self, model: nn.Module) -> None:
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        self.model = model
        self.names = [k for k, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()

    @property
    def M(self) -> int:
        return self.theta.numel()

    def split(self, theta: Tensor) -> dict[str, Tensor]:
        return {k: theta[o:o + s].reshape(shape)
                for k, o, s, shape in zip(self.names, self.offsets, self.sizes, self.shapes)}

    def slice(self, name: str) -> slice:
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i] + self.sizes[i])

    def outputs(self, theta: Tensor, X: Tensor) -> Tensor:
        return functional_call(self.model, self.split(theta), (X,))


def _inputs(flat: Flat, X: Tensor) -> Tensor:
    X = X.to(flat.theta.device)
    return X.to(flat.theta.dtype) if X.is_floating_point() else X


def training_tensors(obj: Objective) -> tuple[Tensor, Tensor]:
    """The training tensors ``obj`` was built from (make_problem / register_data); otherwise
    the raw tensors its data source was constructed with."""
    if obj in _RAW_DATA:
        return _RAW_DATA[obj]
    if obj.train._X is not None and obj.train._y is not None:
        return obj.train._X, obj.train._y
    raise NotImplementedError("register the objective's training tensors with register_data")


def brute_force_outputs(obj: Objective, X: Tensor) -> Tensor:
    """f(x; θ̃) by functional_call on the module, shape (T, K)."""
    flat = Flat(obj.model)
    with torch.no_grad():
        return flat.outputs(flat.theta, _inputs(flat, X))


def brute_force_hessian(obj: Objective, data: tuple[Tensor, Tensor] | None = None,
                        model: nn.Module | None = None) -> Tensor:
    """∇²L(θ̃), L(θ) = (1/n) Σ_i loss(f(x_i; θ), y_i) + (wd/2)‖θ‖², by
    torch.autograd.functional.hessian on our own flattening (reverse-over-reverse), of
    ``model`` (default: the Objective's module) on ``data`` (default: its training tensors)."""
    flat, loss = Flat(obj.model if model is None else model), ref_loss(obj)
    X, y = training_tensors(obj) if data is None else data
    X, y = _inputs(flat, X), y.to(flat.theta.device)
    if y.is_floating_point():
        y = y.to(flat.theta.dtype)
    wd = obj.weight_decay

    def L(theta: Tensor) -> Tensor:
        return loss(flat.outputs(theta, X), y).sum() / len(X) + 0.5 * wd * theta.square().sum()

    return torch.autograd.functional.hessian(L, flat.theta)


def brute_force_hvp(obj: Objective, V: Tensor, data: tuple[Tensor, Tensor] | None = None,
                    chunk: int = 50) -> Tensor:
    """∇²L(θ̃) V for V (M, k), by double backward of our own L (reverse-over-reverse, one column
    at a time, data in chunks): for models too large for :func:`brute_force_hessian`."""
    flat, loss = Flat(obj.model), ref_loss(obj)
    X, y = training_tensors(obj) if data is None else data
    X, y = _inputs(flat, X), y.to(flat.theta.device)
    out = obj.weight_decay * V.clone()
    for s in range(0, len(X), chunk):
        theta = flat.theta.clone().requires_grad_(True)
        value = loss(flat.outputs(theta, X[s:s + chunk]), y[s:s + chunk]).sum() / len(X)
        (g,) = torch.autograd.grad(value, theta, create_graph=True)
        for j in range(V.shape[1]):
            out[:, j] += torch.autograd.grad(g @ V[:, j], theta, retain_graph=j < V.shape[1] - 1)[0]
    return out


def brute_force_gradients(obj: Objective, X: Tensor, y: Tensor, objective_term: bool = True) -> Tensor:
    """Per-sample gradients ∇_θ [loss(f(x; θ̃), y) (+ (wd/2)‖θ̃‖²)], one sample at a time with
    torch.autograd.grad on our own flattening; shape (T, M)."""
    flat, loss = Flat(obj.model), ref_loss(obj)
    X, y = _inputs(flat, X), y.to(flat.theta.device)
    if y.is_floating_point():
        y = y.to(flat.theta.dtype)
    rows = []
    for xi, yi in zip(X, y):
        theta = flat.theta.clone().requires_grad_(True)
        value = loss(flat.outputs(theta, xi[None]), yi[None]).sum()
        if objective_term:
            value = value + 0.5 * obj.weight_decay * theta.square().sum()
        rows.append(torch.autograd.grad(value, theta)[0])
    return torch.stack(rows)


def brute_force_losses(obj: Objective, X: Tensor, y: Tensor, theta: Tensor | None = None,
                       objective_term: bool = True) -> Tensor:
    """Per-sample ℓ(z, θ) (θ = θ̃ by default, in our own flat order), shape (T,)."""
    flat, loss = Flat(obj.model), ref_loss(obj)
    theta = flat.theta if theta is None else theta
    X, y = _inputs(flat, X), y.to(flat.theta.device)
    with torch.no_grad():
        out = loss(flat.outputs(theta, X), y)
        return out + 0.5 * obj.weight_decay * theta.square().sum() if objective_term else out


def output_hessian(obj: Objective, out: Tensor, y: Tensor) -> Tensor:
    """Λ = ∇²_f loss(f, y) of one sample (out (K,), y scalar), by torch.func.hessian of our loss."""
    loss = ref_loss(obj)
    return torch.func.hessian(lambda o: loss(o.view(1, -1), y.view(1, *y.shape))[0])(out)


def brute_force_ggn(obj: Objective, data: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """(1/n) Σ_i J_iᵀ Λ_i J_i + wd·I with J_i = ∂f(x_i)/∂θ (torch.func.jacrev on our flattening)
    and Λ_i the Hessian of our loss in the output."""
    flat = Flat(obj.model)
    X, y = training_tensors(obj) if data is None else data
    X, y = _inputs(flat, X), y.to(flat.theta.device)
    if y.is_floating_point():
        y = y.to(flat.theta.dtype)
    ggn = torch.zeros(flat.M, flat.M, dtype=flat.theta.dtype, device=flat.theta.device)
    for xi, yi in zip(X, y):
        f = lambda th: flat.outputs(th, xi[None])[0].reshape(-1)  # noqa: E731
        J = torch.func.jacrev(f)(flat.theta)                          # (K, M)
        Lam = output_hessian(obj, f(flat.theta).detach(), yi)
        ggn += J.T @ Lam @ J
    return ggn / len(X) + obj.weight_decay * torch.eye(flat.M, dtype=ggn.dtype, device=ggn.device)


@pytest.fixture(params=["mlp", "cnn"])
def problem(request) -> Objective:
    return make_problem(request.param)


# --------------------------------------------------------------------------- Kronecker factors
def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """The inputs each output position of ``module`` sees, shape (T, in·k) in the order of
    ``weight.reshape(out, -1)`` (channel slowest), by explicit slicing of the padded input
    (one sample, x of shape (1, C, L) or (1, C, H, W)); for a Linear, (1, in)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    nd = 1 if isinstance(module, nn.Conv1d) else 2
    ks, st, dl = (tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation))
    if isinstance(module.padding, str):
        pads = [(0, 0)] * nd if module.padding == "valid" else \
            [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(ks, dl)]
    else:
        pads = [(p, p) for p in module.padding]
    flat_pad = [v for lr in reversed(pads) for v in lr]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    xp = torch.nn.functional.pad(x, flat_pad, mode=mode)[0] if any(flat_pad) else x[0]
    sizes = [(xp.shape[1 + i] - dl[i] * (ks[i] - 1) - 1) // st[i] + 1 for i in range(nd)]
    rows = []
    if nd == 1:
        for t in range(sizes[0]):
            s0 = t * st[0]
            rows.append(xp[:, s0:s0 + dl[0] * (ks[0] - 1) + 1:dl[0]].reshape(-1))
    else:
        for t0 in range(sizes[0]):
            for t1 in range(sizes[1]):
                s0, s1 = t0 * st[0], t1 * st[1]
                rows.append(xp[:, s0:s0 + dl[0] * (ks[0] - 1) + 1:dl[0], s1:s1 + dl[1] * (ks[1] - 1) + 1:dl[1]].reshape(-1))
    return torch.stack(rows)


def brute_force_kronecker_factors(obj: Objective, data: tuple[Tensor, Tensor] | None = None) -> list[dict]:
    """K-FAC factors of every Linear / Conv1d / Conv2d (groups = 1) with a trainable weight,
    one sample at a time, independently of the library:

    * ã_{n,t}: the layer's input patch at output position t (explicit slicing), with a
      trailing 1 when the layer has a bias; A = (1/(nT)) Σ_{n,t} ã ãᵀ;
    * b_{n,c} = √μ_c u_c from eigh of our loss's output Hessian Λ_n (autograd);
      δ_{n,c,t} = ∂(b_{n,c}ᵀ f(x_n)) / ∂s_t, s the layer's output (autograd);
      G = (1/n) Σ_{n,c,t} δ δᵀ;
    * grads: the per-sample GGN gradients Σ_t δ_{n,c,t} ã_{n,t}ᵀ, shape (n, C, out, d_in),
      asserted equal to the autograd gradient of b_{n,c}ᵀ f w.r.t. [W | b].

    Returns one dict per layer: name, index (flat positions of row-major vec [W | b]), A, G, grads.
    """
    flat = Flat(obj.model)
    model = obj.model
    X, y = training_tensors(obj) if data is None else data
    X, y = _inputs(flat, X), y.to(flat.theta.device)
    layers = []
    for mname, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)) or f"{mname}.weight" not in flat.names:
            continue
        if not isinstance(mod, nn.Linear) and mod.groups != 1:
            continue
        wname, bname = f"{mname}.weight", f"{mname}.bias"
        out, d_w = mod.weight.shape[0], mod.weight[0].numel()
        has_b = bname in flat.names
        idx = torch.empty(out, d_w + has_b, dtype=torch.long)
        idx[:, :d_w] = flat.slice(wname).start + torch.arange(out * d_w).view(out, d_w)
        if has_b:
            idx[:, d_w] = flat.slice(bname).start + torch.arange(out)
        layers.append(dict(name=mname, module=mod, wname=wname, bname=bname if has_b else None,
                           index=idx.reshape(-1), out=out, d_in=d_w + has_b, A=0.0, G=0.0, grads=[]))
    records: dict[int, tuple[Tensor, Tensor]] = {}

    def hook(mod, inputs, output):
        records[id(mod)] = (inputs[0].detach(), output)
        return output.clone()  # an in-place op downstream changes the clone, not the recorded output

    handles = [layer["module"].register_forward_hook(hook) for layer in layers]
    try:
        for xi, yi in zip(X, y):
            records.clear()
            params = {k: v.detach().clone().requires_grad_(True) for k, v in flat.split(flat.theta).items()}
            with torch.enable_grad():
                f = functional_call(model, params, (xi[None],))[0].reshape(-1)
            Lam = output_hessian(obj, f.detach(), yi)
            mu, U = torch.linalg.eigh(0.5 * (Lam + Lam.T))
            B = (U * mu.clamp_min(0).sqrt()).T                      # rows b_c: Σ_c b_c b_cᵀ = Λ
            per_layer = [[] for _ in layers]
            patches = []
            for layer in layers:
                a = _patches(layer["module"], records[id(layer["module"])][0])      # (T, in·k)
                if layer["bname"]:
                    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
                patches.append(a)
                layer["A"] = layer["A"] + a.T @ a / a.shape[0]
            for c in range(B.shape[0]):
                scalar = f @ B[c]
                outs = [records[id(layer["module"])][1] for layer in layers]
                wanted = [params[layer["wname"]] for layer in layers] + \
                         [params[layer["bname"]] for layer in layers if layer["bname"]]
                gs = torch.autograd.grad(scalar, outs + wanted, retain_graph=True, allow_unused=True)
                d_out, d_par = gs[:len(layers)], dict(zip([l["wname"] for l in layers] +
                                                          [l["bname"] for l in layers if l["bname"]],
                                                          gs[len(layers):]))
                for j, layer in enumerate(layers):
                    d = torch.zeros_like(outs[j]) if d_out[j] is None else d_out[j]
                    d = d.reshape(layer["out"], -1).T if not isinstance(layer["module"], nn.Linear) \
                        else d.reshape(-1, layer["out"])                       # (T, out)
                    a = patches[j]
                    g = d.T @ a                                                # Σ_t δ_t ã_tᵀ (out, d_in)
                    W_grad = d_par[layer["wname"]].reshape(layer["out"], -1)
                    if layer["bname"]:
                        W_grad = torch.cat([W_grad, d_par[layer["bname"]].reshape(-1, 1)], dim=1)
                    torch.testing.assert_close(g, W_grad, rtol=1e-10, atol=1e-12)
                    per_layer[j].append(g.detach())
                    layer["G"] = layer["G"] + d.T.detach() @ d.detach()
            for j, layer in enumerate(layers):
                layer["grads"].append(torch.stack(per_layer[j]))
    finally:
        for h in handles:
            h.remove()
    n = len(X)
    for layer in layers:
        layer["A"], layer["G"] = layer["A"] / n, layer["G"] / n
        layer["grads"] = torch.stack(layer["grads"])                              # (n, C, out, d_in)
        del layer["module"]
    return layers


def kronecker_matrix(obj: Objective, layers: list[dict], corrected: bool,
                     ggn: Tensor | None = None) -> Tensor:
    """The K-FAC (``corrected=False``: blockdiag G ⊗ A) or EK-FAC (Q diag(S) Qᵀ, Q = Q_G ⊗ Q_A from
    eigh of the factors, S the mean squared per-sample GGN gradient in that basis) matrix of
    ``layers``, plus the exact GGN diagonal (from ``ggn``) on every parameter outside them, plus wd·I."""
    M = Flat(obj.model).M
    C = torch.zeros(M, M, dtype=torch.float64)
    covered = torch.zeros(M, dtype=torch.bool)
    for layer in layers:
        idx = layer["index"]
        if corrected:
            QA, QG = torch.linalg.eigh(layer["A"])[1], torch.linalg.eigh(layer["G"])[1]
            S = (QG.T @ layer["grads"] @ QA).square().sum(dim=(0, 1)) / layer["grads"].shape[0]
            Q = torch.kron(QG, QA)
            block = (Q * S.reshape(1, -1)) @ Q.T
        else:
            block = torch.kron(layer["G"], layer["A"])
        C[idx.unsqueeze(1), idx.unsqueeze(0)] = block
        covered[idx] = True
    if not covered.all():
        if ggn is None:
            raise ValueError("parameters outside Kronecker layers need the exact GGN for their diagonal")
        rest = (~covered).nonzero().flatten()
        C[rest, rest] = torch.diagonal(ggn)[rest] - obj.weight_decay
    return C + obj.weight_decay * torch.eye(M, dtype=torch.float64)
