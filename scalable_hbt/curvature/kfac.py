"""Kronecker-factored curvature: K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 "KFC"
for convolutions) and its eigenvalue-corrected variant EK-FAC (George et al. 2018).

What is approximated
--------------------
The target is the damped Hessian H + δI of docs/design.md §1, H = ∇²L(θ̃), approximated by

.. math::

    Ĥ = \\mathrm{blockdiag}\\big(F_1, …, F_L, D\\big) + wd\\,I,

where F_l ≈ the layer-l diagonal block of the **generalised Gauss–Newton** (GGN)
matrix of the loss term,

.. math::

    \\mathrm{GGN} = \\frac1n \\sum_n J_n^T Λ_n J_n, \\qquad
    Λ_n = ∇^2_{f}\\,\\mathrm{loss}(f(x_n; θ̃), y_n) = \\sum_c b_{n,c} b_{n,c}^T ,

J_n = ∂f(x_n)/∂θ, and D is a diagonal fallback for parameters outside supported layers.
The output-Hessian square root b_{n,c} is exact (no label sampling):

* cross-entropy: Λ = diag(p) − p pᵀ = Σ_c p_c (e_c − p)(e_c − p)ᵀ, so b_c = √p_c (e_c − p),
  c = 1..C. The GGN of softmax cross-entropy *is* the true ("type-2") Fisher, here with
  the exact expectation over the model's predictive distribution instead of sampled labels;
* mse (our per-sample loss is the *mean* over the K outputs): Λ = (2/K) I, b_k = √(2/K) e_k;
* a callable loss: Λ_n from ``torch.func.hessian`` per sample, eigendecomposed, eigenvalues
  below K·eps·max|μ| (negative ones included) set to zero (b = √μ u); factors that are zero for
  every sample of a chunk are dropped, so a chunk costs rank(Λ) backward passes, not K.

"Output gradients" below are δ_{n,c} = J_nᵀ-backpropagated b_{n,c}, i.e. the gradient of
b_{n,c}ᵀ f(x_n) with respect to a layer's pre-activation output s.

Supported layers and factors
----------------------------
``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (``groups = 1``), weight and bias together in
homogeneous coordinates: the layer's parameters form the matrix

    W̃ = [W_flat | b]  of shape (out, d_in),  d_in = in·k + 1 (or in·k without bias),

with W_flat = weight.reshape(out, in·k) (PyTorch's (out, in[, kh, kw]) layout, channel
slowest, matching ``F.unfold``) and the bias as the last column. Row-major vec(W̃) is the
ordering used for the Kronecker product. With ã_{n,t} ∈ R^{d_in} the (unfolded, homogeneous)
input at position t (t = 1..T; T = 1 for a plain Linear on (B, in) inputs, T = number of
output positions for a convolution, KFC) and δ_{n,c,t} ∈ R^{out} the output gradient:

.. math::

    A = \\frac{1}{nT} \\sum_{n,t} ã_{n,t} ã_{n,t}^T \\;(d_{in}×d_{in}), \\qquad
    G = \\frac{1}{n} \\sum_{n,c,t} δ_{n,c,t} δ_{n,c,t}^T \\;(out×out), \\qquad
    F ≈ G ⊗ A

(A averaged over positions, G summed, as in KFC; for T = 1 this is plain K-FAC). For token
sequences with an ``attention_mask`` the average runs over each sample's unmasked positions
(T_n of them), so padding never enters A. The
per-sample gradient of the layer for output direction c is ∇W̃_{n,c} = Σ_t δ_{n,c,t} ã_{n,t}ᵀ,
so the exact GGN block is F = (1/n) Σ_{n,c} vec(∇W̃_{n,c}) vec(∇W̃_{n,c})ᵀ.

Inverse
-------
With A = Q_A diag(λ_A) Q_Aᵀ, G = Q_G diag(λ_G) Q_Gᵀ (float64 ``eigh``, eigenvalues clipped
at 0), the layer block of (Ĥ + δI)⁻¹ acts on a matrix V (out, d_in) as

.. math::

    V \\mapsto Q_G \\big[ (Q_G^T V Q_A) ⊘ (S + δ') \\big] Q_A^T, \\qquad δ' = δ + wd,

with the eigenvalue matrix S (out, d_in):

* K-FAC: S_ij = λ_G,i λ_A,j;
* EK-FAC: S_ij = (1/n) Σ_{n,c} (Q_Gᵀ ∇W̃_{n,c} Q_A)_ij², the exact diagonal of the GGN
  block in the Kronecker eigenbasis. It is the Frobenius-optimal diagonal in that basis,
  so ‖F − (Q_G⊗Q_A) diag(S) (Q_G⊗Q_A)ᵀ‖_F never exceeds K-FAC's error, and where K-FAC
  is exact (e.g. one Linear layer under MSE) both coincide.

``inverse_norms`` uses the rotation invariance of the norm: ‖(Ĥ+δI)⁻¹ g‖² =
Σ_layers ‖(Q_Gᵀ Ṽ Q_A) ⊘ (S + δ')‖_F² + Σ_fallback (g_i / (d_i + δ'))², with no rotation back.

Diagonal fallback
-----------------
Every other trainable parameter (batch-norm, embeddings, bare ``nn.Parameter`` s, layers
excluded with ``unsupported="diagonal"``) gets the exact diagonal of the GGN,
d_i = (1/n) Σ_{n,c} (∂ b_{n,c}ᵀ f(x_n) / ∂θ_i)², computed from per-sample gradients (vmap),
and one ``UserWarning`` names those parameters.

All factors and eigendecompositions are float64. The curvature is taken in eval mode on
the Objective's own model copy (which holds θ̃), streaming the training data in chunks.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from .. import distributed
from ..data import batch_size_of, map_tensors
from ..errors import InputError
from ..operators import CurvatureOperator
from ..objective import Objective
from .base import CurvatureBackend, State, expect_shape

_F64 = torch.float64
_CORRECTION_NUMBERS = 2**25  # per-sample rotated gradients held at once by the EK-FAC pass (256 MiB in float64)
Unsupported = Literal["error", "diagonal"]


class KFACFallbackWarning(UserWarning):
    """Some trainable parameters are not covered by Kronecker factors and use a diagonal."""


class KFACTiedWeightWarning(KFACFallbackWarning):
    """A factored layer's weight is tied to another parameter (an LM head sharing the token
    embedding): its factors see this layer's use only, and the other use's curvature is left out."""


@dataclass
class _Layer:
    """One Kronecker-factored layer and where its parameters sit in the flat vector."""

    name: str
    module: nn.Module
    kind: str                    # "linear" | "conv1d" | "conv2d"
    w_range: tuple[int, int]     # flat slice of the weight
    b_range: tuple[int, int] | None
    out: int
    d_w: int                     # in·k
    transposed: bool = False     # weight stored (in, out), as Hugging Face's Conv1D does
    A: Tensor | None = None      # Kronecker factors, held only while fitting
    G: Tensor | None = None
    QA: Tensor | None = None
    QG: Tensor | None = None
    lamA: Tensor | None = None
    lamG: Tensor | None = None
    S: Tensor | None = None      # (out, d_in) eigenvalues used by the inverse
    calls: list = field(default_factory=list)  # per forward: [(ã (B, T, d_in), s)]

    @property
    def d_in(self) -> int:
        return self.d_w + (1 if self.b_range is not None else 0)

    @property
    def numel(self) -> int:
        return self.out * self.d_in

    def gather(self, rows: Tensor) -> Tensor:
        """Rows of flat vectors ``(k, M)`` → homogeneous matrices ``(k, out, d_in)``."""
        w0, w1 = self.w_range
        if self.transposed:
            W = rows[:, w0:w1].reshape(rows.shape[0], self.d_w, self.out).transpose(1, 2)
        else:
            W = rows[:, w0:w1].reshape(rows.shape[0], self.out, self.d_w)
        if self.b_range is None:
            return W
        b0, b1 = self.b_range
        return torch.cat([W, rows[:, b0:b1].reshape(rows.shape[0], self.out, 1)], dim=2)

    def scatter(self, rows: Tensor, mats: Tensor) -> None:
        """Write homogeneous matrices ``(k, out, d_in)`` back into flat rows ``(k, M)``."""
        w0, w1 = self.w_range
        W = mats[:, :, :self.d_w]
        rows[:, w0:w1] = (W.transpose(1, 2) if self.transposed else W).reshape(rows.shape[0], -1)
        if self.b_range is not None:
            b0, b1 = self.b_range
            rows[:, b0:b1] = mats[:, :, self.d_w]

    def flat_index(self) -> Tensor:
        """Flat parameter index of every entry of row-major vec(W̃), shape ``(out·d_in,)``."""
        idx = torch.empty(self.out, self.d_in, dtype=torch.long)
        w0, _ = self.w_range
        if self.transposed:
            idx[:, :self.d_w] = w0 + torch.arange(self.out * self.d_w).view(self.d_w, self.out).T
        else:
            idx[:, :self.d_w] = w0 + torch.arange(self.out * self.d_w).view(self.out, self.d_w)
        if self.b_range is not None:
            idx[:, self.d_w] = self.b_range[0] + torch.arange(self.out)
        return idx.reshape(-1)


def _is_transposed_linear(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's attention and MLP projections): a linear layer
    x ↦ x W + b with its weight stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _pair(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _unfold_input(module: nn.Module, kind: str, x: Tensor) -> Tensor:
    """Layer input → patches ``(B, T, in·k)`` in the order of ``weight.reshape(out, -1)``."""
    if kind == "linear":
        return x.reshape(x.shape[0], -1, x.shape[-1])
    nd = 1 if kind == "conv1d" else 2
    if x.ndim == nd + 1:  # unbatched input
        x = x.unsqueeze(0)
    ks, st, dl = _pair(module.kernel_size, nd), _pair(module.stride, nd), _pair(module.dilation, nd)
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            pads = [(0, 0)] * nd
        else:  # "same": total padding d·(k−1), the extra element on the right (PyTorch's rule)
            pads = []
            for k, d in zip(ks, dl):
                tot = d * (k - 1)
                pads.append((tot // 2, tot - tot // 2))
    else:
        pads = [(p, p) for p in _pair(pad, nd)]
    # F.pad takes (last-dim-left, last-dim-right, previous-dim-left, ...)
    flat_pad = [v for lr in reversed(pads) for v in lr]
    if any(flat_pad):
        mode = module.padding_mode if module.padding_mode != "zeros" else "constant"
        x = F.pad(x, flat_pad, mode=mode)
    if nd == 1:
        x = x.unsqueeze(2)  # (B, C, 1, L)
        ks, st, dl = (1, ks[0]), (1, st[0]), (1, dl[0])
    cols = F.unfold(x, kernel_size=ks, dilation=dl, padding=0, stride=st)  # (B, C·k, T)
    return cols.transpose(1, 2)


def _output_grads(s: Tensor, kind: str) -> Tensor:
    """Gradient w.r.t. a layer's output → ``(B, T, out)``."""
    if kind == "linear":
        return s.reshape(s.shape[0], -1, s.shape[-1])
    return s.reshape(s.shape[0], s.shape[1], -1).transpose(1, 2)


def output_hessian_sqrt(objective: Objective, out: Tensor, y: Tensor) -> Tensor:
    """Factors b with Λ_n = Σ_c b_{n,c} b_{n,c}ᵀ, the per-sample Hessian of the loss with
    respect to the model output; shape ``(R, B, *out.shape[1:])``."""
    B = out.shape[0]
    flat = out.detach().reshape(B, -1)
    K = flat.shape[1]
    name = objective.loss.name
    if name == "cross_entropy" and out.ndim == 2:
        p = torch.softmax(flat, dim=1)
        eye = torch.eye(K, dtype=p.dtype, device=p.device)
        b = p.sqrt().T.unsqueeze(2) * (eye.unsqueeze(1) - p.unsqueeze(0))   # (C, B, K): √p_c (e_c − p)
    elif name == "mse":
        eye = torch.eye(K, dtype=flat.dtype, device=flat.device)
        b = math.sqrt(2.0 / K) * eye.unsqueeze(1).expand(K, B, K)
    else:
        def one(o: Tensor, t: Tensor) -> Tensor:
            return objective.loss.fn(o.view(1, *out.shape[1:]), t.unsqueeze(0)).squeeze(0)

        Lam = vmap(torch.func.hessian(one))(flat, y)                          # (B, K, K)
        mu, U = torch.linalg.eigh(0.5 * (Lam + Lam.transpose(1, 2)))
        # eigenvalues below the decomposition's rounding level K·eps·max|μ| are zero (as matrix_rank
        # counts them); a factor that is zero for every sample of the chunk adds nothing to Λ but
        # would cost a backward pass, so it is dropped: token losses have rank (T − 1)(V − 1) of
        # K = T·V (softmax's constant direction, positions without a target)
        tol = K * torch.finfo(mu.dtype).eps * mu.abs().amax(dim=1, keepdim=True)
        mu = torch.where(mu > tol, mu, torch.zeros_like(mu))
        keep = (mu > 0).any(dim=0)
        keep[-1] = True                                                       # at least one factor
        b = (U[:, :, keep] * mu[:, keep].sqrt().unsqueeze(1)).permute(2, 0, 1)  # (R ≤ K, B, K)
    return b.reshape(b.shape[0], B, *out.shape[1:]).contiguous()


class KFACCurvature(CurvatureBackend):
    """K-FAC: (Ĥ + δI)⁻¹ with Ĥ = blockdiag(G_l ⊗ A_l, D) + wd·I (see the module docstring).

    Parameters
    ----------
    unsupported:
        What to do with a Conv1d/Conv2d with ``groups > 1``: ``"error"`` (default) raises
        an :class:`InputError` naming the layer; ``"diagonal"`` puts its parameters into
        the diagonal fallback (with the fallback warning).

    Attributes
    ----------
    layers:
        The Kronecker-factored layers, each with ``A (d_in, d_in)``, ``G (out, out)``, their
        float64 eigendecompositions ``QA, lamA, QG, lamG`` and the eigenvalue matrix
        ``S (out, d_in)``.
    diag:
        The fallback diagonal ``(len(diag_index),)`` at flat indices ``diag_index``.
    """

    name = "kfac"
    roles = frozenset({"inverse"})
    _corrected = False

    def __init__(self, unsupported: Unsupported = "error") -> None:
        super().__init__()
        if unsupported not in ("error", "diagonal"):
            raise InputError(f"unsupported must be 'error' or 'diagonal'; got {unsupported!r}.")
        self.unsupported = unsupported
        self.layers: list[_Layer] = []
        self.diag_index: Tensor | None = None
        self.diag: Tensor | None = None
        self.diag_names: list[str] = []
        self.weight_decay = 0.0
        self._recording = False

    # ------------------------------------------------------------------ layer discovery
    def _discover(self, obj: Objective) -> None:
        offsets, o = {}, 0
        for name, numel in zip(obj.param_names, obj.param_numels):
            offsets[name] = (o, o + numel)
            o += numel
        covered: set[str] = set()
        self.layers = []
        users: dict[int, list[tuple[str, nn.Module]]] = {}  # parameter → (name, owning module) of every use
        for prefix, owner in obj.model.named_modules(remove_duplicate=False):
            for leaf, p in owner._parameters.items():
                if p is not None:
                    users.setdefault(id(p), []).append((f"{prefix}.{leaf}" if prefix else leaf, owner))
        tied: list[str] = []
        for mname, mod in obj.model.named_modules():
            transposed = _is_transposed_linear(mod)
            if isinstance(mod, nn.Linear) or transposed:
                kind = "linear"
            elif isinstance(mod, nn.Conv1d):
                kind = "conv1d"
            elif isinstance(mod, nn.Conv2d):
                kind = "conv2d"
            else:
                continue
            prefix = f"{mname}." if mname else ""
            wname, bname = prefix + "weight", prefix + "bias"
            if wname not in offsets:  # frozen weight: nothing to factor
                continue
            label = mname or type(mod).__name__
            if kind != "linear" and mod.groups != 1:
                if self.unsupported == "error":
                    raise InputError(
                        f"K-FAC supports only groups=1 convolutions, but layer {label!r} ({mod}) has "
                        f"groups={mod.groups}. Use KFACCurvature(unsupported='diagonal') to give its "
                        "parameters the diagonal fallback, or another inverse backend (cg, lissa, dense)."
                    )
                continue
            has_b = bname in offsets
            out, d_w = (mod.weight.shape[1], mod.weight.shape[0]) if transposed else \
                (mod.weight.shape[0], mod.weight[0].numel())
            self.layers.append(_Layer(label, mod, kind, offsets[wname], offsets[bname] if has_b else None,
                                      out, d_w, transposed=transposed))
            covered.update([wname] + ([bname] if has_b else []))
            others = [k for k, owner in users.get(id(mod.weight), []) if owner is not mod]
            if others:  # the same tensor is a parameter of another module (a shared module is fine: hooked per call)
                tied.append(f"{label!r} (its weight is also {', '.join(repr(k) for k in others)})")
        if tied:
            warnings.warn(
                f"{self.name}: the weights of layer(s) {'; '.join(tied)} are tied to other modules' parameters; their "
                "Kronecker factors describe the layer's own use only, and the curvature the other use contributes to "
                "the same tensor (e.g. a token embedding's) is left out of the approximation. Prefer cg/lissa/lanczos "
                "for such tensors, or leave them out with params=[...].",
                KFACTiedWeightWarning, stacklevel=3,
            )
        self.diag_names = [k for k in obj.param_names if k not in covered]
        idx = [torch.arange(*offsets[k]) for k in self.diag_names]
        self.diag_index = torch.cat(idx).to(obj.device) if idx else torch.zeros(0, dtype=torch.long, device=obj.device)
        if self.diag_names:
            warnings.warn(
                f"{self.name}: no Kronecker factors for parameters {self.diag_names} (only Linear, Hugging Face "
                "Conv1D, Conv1d and Conv2d with groups=1 are factored); they use the exact GGN diagonal instead.",
                KFACFallbackWarning, stacklevel=3,
            )

    # ------------------------------------------------------------------ one pass over the data
    def _hooks(self) -> list:
        handles = []
        for layer in self.layers:
            def hook(mod, inputs, output, layer=layer):
                if not self._recording:
                    return None
                a = _unfold_input(mod, layer.kind, inputs[0].detach()).to(_F64)
                if layer.b_range is not None:
                    a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
                layer.calls.append((a, output))
                return output.clone()  # later in-place ops (ReLU(inplace=True)) modify the clone only
            handles.append(layer.module.register_forward_hook(hook))
        return handles

    def _pass(self, obj: Objective, visit) -> None:
        """Stream the training data; for each chunk call ``visit(layer, ã (B,T,d_in), δ (R,B,T,out),
        counts (B,))`` for every layer (one forward, R = rank of the output Hessian backward passes),
        and accumulate the fallback diagonal when there are fallback parameters.

        Padding: for dict inputs with an ``attention_mask`` (B, T), a layer applied position-wise
        to the T tokens has ã zeroed at masked positions and ``counts`` = the unmasked positions of
        each sample (else T): A averages over real tokens only. (δ is zero there anyway: nothing
        the loss reads depends on a masked position.)"""
        handles = self._hooks()
        try:
            for _, x, y in obj.batches(obj.train, desc=f"{self.name} factors" if obj.progress else None):
                for layer in self.layers:
                    layer.calls = []
                self._recording = True
                with torch.enable_grad():  # the layers' outputs need a graph for their output gradients
                    out = obj.forward(obj.theta.detach().requires_grad_(True), x)
                self._recording = False
                b = output_hessian_sqrt(obj, out, y)
                tensors = [s for layer in self.layers for _, s in layer.calls]
                per_c = []
                for c in range(b.shape[0]):
                    gs = torch.autograd.grad(out, tensors, grad_outputs=b[c], retain_graph=c < b.shape[0] - 1,
                                             allow_unused=True)
                    per_c.append([torch.zeros_like(t) if g is None else g for g, t in zip(gs, tensors)])
                mask = x.get("attention_mask") if isinstance(x, dict) else None
                i = 0
                for layer in self.layers:
                    a_parts, d_parts, counts = [], [], 0
                    for a, _ in layer.calls:
                        d_parts.append(torch.stack([_output_grads(pc[i], layer.kind) for pc in per_c]).to(_F64))
                        if mask is not None and layer.kind == "linear" and a.shape[:2] == mask.shape:
                            keep = (mask != 0).to(_F64)
                            a = a * keep.unsqueeze(2)
                            counts = counts + keep.sum(1)
                        else:
                            counts = counts + a.new_full((a.shape[0],), a.shape[1])
                        a_parts.append(a)
                        i += 1
                    if a_parts:  # several calls of a shared layer: their positions are concatenated
                        visit(layer, torch.cat(a_parts, dim=1), torch.cat(d_parts, dim=2), counts.clamp_min(1))
                    layer.calls = []
                if self.diag_index.numel():
                    self._accumulate_diag(obj, x, b)
        finally:
            self._recording = False
            for h in handles:
                h.remove()

    def _accumulate_diag(self, obj: Objective, x: Tensor, b: Tensor) -> None:
        """d += Σ_{n,c} (∂ b_{n,c}ᵀ f(x_n) / ∂θ_i)² for the fallback indices i."""
        chunk = max(1, obj.per_sample_grad_chunk())
        for s in range(0, batch_size_of(x), chunk):
            part = map_tensors(lambda t: t[s:s + chunk], x)
            for c in range(b.shape[0]):
                g = obj.sample_gradients(lambda out, bc: (out * bc).sum(), part, b[c, s:s + chunk],
                                         indices=self.diag_index)
                self.diag += g.to(_F64).square().sum(0)

    # ------------------------------------------------------------------ fit
    def fit(self, operator: CurvatureOperator) -> KFACCurvature:
        t0 = time.perf_counter()
        obj = operator.objective
        self._recording = False
        self.weight_decay = obj.weight_decay
        self._discover(obj)
        dev = obj.device
        for layer in self.layers:
            layer.A = torch.zeros(layer.d_in, layer.d_in, dtype=_F64, device=dev)
            layer.G = torch.zeros(layer.out, layer.out, dtype=_F64, device=dev)
        self.diag = torch.zeros(self.diag_index.numel(), dtype=_F64, device=dev)

        def factors(layer: _Layer, a: Tensor, d: Tensor, counts: Tensor) -> None:
            layer.A += torch.einsum("bti,btj,b->ij", a, a, 1.0 / counts)
            layer.G += torch.einsum("cbti,cbtj->ij", d, d)

        self._pass(obj, factors)
        for layer in self.layers:  # under torch.distributed each rank saw its shard of the data
            distributed.all_reduce_sum(layer.A)
            distributed.all_reduce_sum(layer.G)
        distributed.all_reduce_sum(self.diag)
        n = obj.n
        for layer in self.layers:  # eigh reads one triangle; the factors are then dropped (only Q, λ are used)
            layer.lamA, layer.QA = torch.linalg.eigh(layer.A.div_(n), UPLO="L")
            layer.lamG, layer.QG = torch.linalg.eigh(layer.G.div_(n), UPLO="L")
            layer.A = layer.G = None
            layer.lamA.clamp_(min=0)
            layer.lamG.clamp_(min=0)
            layer.S = layer.lamG.unsqueeze(1) * layer.lamA.unsqueeze(0)
        self.diag /= n
        passes = 1
        if self._corrected:
            for layer in self.layers:
                layer.S = torch.zeros_like(layer.S)

            def corrected(layer: _Layer, a: Tensor, d: Tensor, counts: Tensor) -> None:
                ar = a @ layer.QA                                   # (B, T, d_in)
                dr = d @ layer.QG                                   # (R, B, T, out)
                # rotated per-sample gradients, a few samples at a time: (R, s, out, d_in) ≤ 2²⁵ numbers
                step = max(1, _CORRECTION_NUMBERS // (dr.shape[0] * layer.out * layer.d_in))
                for s0 in range(0, ar.shape[0], step):
                    g = torch.einsum("cbto,bti->cboi", dr[:, s0:s0 + step], ar[s0:s0 + step])
                    layer.S += g.square().sum(dim=(0, 1))

            saved = self.diag_index
            self.diag_index = saved[:0]  # the fallback diagonal is already known from pass 1
            try:
                self._pass(obj, corrected)
            finally:
                self.diag_index = saved
            for layer in self.layers:
                layer.S = distributed.all_reduce_sum(layer.S) / n
            passes = 2
        self._mark_fitted(operator)
        kron = sum(layer.numel for layer in self.layers)
        self.diagnostics = {
            "layers": [{"name": l.name, "kind": l.kind, "A": (l.d_in, l.d_in), "G": (l.out, l.out)}
                       for l in self.layers],
            "kronecker_params": kron,
            "diagonal_params": int(self.diag_index.numel()),
            "diagonal_names": list(self.diag_names),
            "curvature": "GGN (exact-expectation Fisher for cross-entropy) + wd·I",
            "passes": passes,
            "seconds": time.perf_counter() - t0,
        }
        return self

    # ------------------------------------------------------------------ saved state
    _LAYER_TENSORS = ("QA", "QG", "lamA", "lamG", "S")

    def _layout(self) -> list[dict[str, Any]]:
        return [{"name": l.name, "kind": l.kind, "transposed": l.transposed, "out": l.out, "d_in": l.d_in} for l in self.layers]

    def state_dict(self) -> State:
        state: State = {"weight_decay": self.weight_decay, "diag_index": self.diag_index, "diag": self.diag,
                        "diag_names": list(self.diag_names), "diagnostics": dict(self.diagnostics),
                        "layers": self._layout()}
        for i, layer in enumerate(self.layers):
            for t in self._LAYER_TENSORS:
                state[f"layer{i}.{t}"] = getattr(layer, t)
        return state

    def load_state_dict(self, state: State, operator: CurvatureOperator) -> None:
        self._recording = False
        self._discover(operator.objective)  # module references and flat ranges (re-emits the fallback warning)
        if self._layout() != state["layers"]:
            raise ValueError(f"layer layout differs: stored {state['layers']}, model has {self._layout()}")
        if not torch.equal(state["diag_index"].to(self.diag_index.device), self.diag_index):
            raise ValueError("fallback parameter indices differ")
        for i, layer in enumerate(self.layers):
            for t in self._LAYER_TENSORS:
                setattr(layer, t, state[f"layer{i}.{t}"])
            expect_shape(layer.S, (layer.out, layer.d_in), f"layer{i}.S")
        self.diag = state["diag"]
        self.diag_names = list(state["diag_names"])
        self.weight_decay = float(state["weight_decay"])
        self.diagnostics = dict(state["diagnostics"])
        self._mark_fitted(operator)

    def memory_estimate(self, operator: CurvatureOperator, columns: int) -> dict[str, int]:
        probe = type(self)(self.unsupported)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KFACFallbackWarning)
            probe._discover(operator.objective)
        factors = sum(l.d_in ** 2 + l.out ** 2 + l.out * l.d_in for l in probe.layers) + 2 * probe.diag_index.numel()
        M = operator.shape[0]
        return {"kronecker_factors": 8 * factors, "fit_chunk": 8 * _CORRECTION_NUMBERS, "solve_work": 2 * 8 * M * columns}

    # ------------------------------------------------------------------ products
    def _eigenvalue_offset(self, damping: float) -> float:
        """δ' = δ + wd, added to every eigenvalue of the factored loss curvature."""
        self.operator  # raises when not fitted
        offset = float(damping) + self.weight_decay
        if not offset > 0:
            raise InputError(
                f"{self.name}: damping + weight_decay must be > 0 for the Kronecker approximation "
                f"(PSD by construction) to be invertible; got damping={damping}, weight_decay={self.weight_decay}."
            )
        return offset

    def _rows(self, V: Tensor, what: str, transpose: bool) -> Tensor:
        M = self.operator.shape[0]
        R = V.T if transpose else V
        if R.ndim != 2 or R.shape[1] != M:
            raise InputError(f"{self.name}.{what}: expected shape {'(M, k)' if transpose else '(c, M)'} with "
                             f"M = {M}; got {tuple(V.shape)}.")
        return R.to(device=self.operator.device, dtype=_F64)

    def solve(self, V: Tensor, damping: float) -> Tensor:
        """(Ĥ + δI)⁻¹ V for ``V (M, k)``; per layer Q_G[(Q_Gᵀ Ṽ Q_A) ⊘ (S + δ')]Q_Aᵀ, δ' = δ + wd."""
        offset = self._eigenvalue_offset(damping)
        rows = self._rows(V, "solve", transpose=True)
        out = torch.empty_like(rows)
        for layer in self.layers:
            Wr = layer.QG.T @ layer.gather(rows) @ layer.QA
            layer.scatter(out, layer.QG @ (Wr / (layer.S + offset)) @ layer.QA.T)
        if self.diag_index.numel():
            out[:, self.diag_index] = rows[:, self.diag_index] / (self.diag + offset)
        return out.T.to(V.dtype)

    def inverse_norms(self, G: Tensor, damping: float) -> Tensor:
        """‖(Ĥ + δI)⁻¹ g_r‖ for rows of ``G (c, M)``, in the eigenbasis (no rotation back); ``(c,)``."""
        offset = self._eigenvalue_offset(damping)
        rows = self._rows(G, "inverse_norms", transpose=False)
        sq = torch.zeros(rows.shape[0], dtype=_F64, device=rows.device)
        for layer in self.layers:
            Wr = layer.QG.T @ layer.gather(rows) @ layer.QA
            sq += (Wr / (layer.S + offset)).square().sum(dim=(1, 2))
        if self.diag_index.numel():
            sq += (rows[:, self.diag_index] / (self.diag + offset)).square().sum(1)
        return sq.sqrt().to(G.dtype)

    def inverse_quadratic(self, G: Tensor, damping: float) -> Tensor:
        """gᵀ(Ĥ + δI)⁻¹g for rows of ``G (c, M)`` in the eigenbasis: Σ (Q_Gᵀ G̃ Q_A)² ⊘ (S + δ'), plus
        the diagonal part; ``(c,)``. One pass of products, no solve."""
        offset = self._eigenvalue_offset(damping)
        rows = self._rows(G, "inverse_quadratic", transpose=False)
        total = torch.zeros(rows.shape[0], dtype=_F64, device=rows.device)
        for layer in self.layers:
            Wr = layer.QG.T @ layer.gather(rows) @ layer.QA
            total += (Wr.square() / (layer.S + offset)).sum(dim=(1, 2))
        if self.diag_index.numel():
            total += (rows[:, self.diag_index].square() / (self.diag + offset)).sum(1)
        return total.to(G.dtype)

    def dense_matrix(self) -> Tensor:
        """The approximation Ĥ (M × M, float64, undamped, including wd·I), for tests and small models."""
        M = self.operator.shape[0]
        H = torch.zeros(M, M, dtype=_F64, device=self.operator.device)
        for layer in self.layers:
            Q = torch.kron(layer.QG, layer.QA)
            blk = (Q * layer.S.reshape(1, -1)) @ Q.T
            idx = layer.flat_index().to(H.device)
            H[idx.unsqueeze(1), idx.unsqueeze(0)] = blk
        if self.diag_index.numel():
            H[self.diag_index, self.diag_index] = self.diag
        return H + self.weight_decay * torch.eye(M, dtype=_F64, device=H.device)


class EKFACCurvature(KFACCurvature):
    """EK-FAC: K-FAC's Kronecker eigenbases with the eigenvalues λ_G λ_Aᵀ replaced by
    S_ij = (1/n) Σ_{n,c} (Q_Gᵀ ∇W̃_{n,c} Q_A)_ij² (a second pass over the data)."""

    name = "ekfac"
    _corrected = True
