"""Brute-force references for real architectures (Hugging Face transformers, recurrent layers,
batch-norm ResNets), independent of the library.

Like ``conftest.py``, nothing here calls the library's forward, loss, flattening or regulariser.
A :class:`Reference` holds the raw ``nn.Module``, the names of the tensors it studies (its own
choice and order), and the loss written out for the family's task. It evaluates the module with
``torch.func.functional_call`` on the model's own inputs (keyword arguments for dict batches,
positional otherwise) and differentiates with ``torch.autograd.functional.hessian`` /
``jacobian`` and ``torch.autograd.grad``.

Data is kept as a dict of tensors, batch first: the model's inputs plus the targets under
``"labels"``; ``inputs`` says which keys the model takes and how (a list of names for keyword
arguments, or ``("x",)``-style positional tuples).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

IGNORE = -100


# --------------------------------------------------------------------------- losses, written out
def ref_class_ce(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """−log softmax(f)_y = logsumexp(f) − f_y per sample, logits (B, C)."""
    y = batch["labels"]
    return torch.logsumexp(logits, dim=1) - logits.gather(1, y.unsqueeze(1)).squeeze(1)


def _token_nll_sum(logits: Tensor, targets: Tensor, keep: Tensor) -> Tensor:
    """Σ_t keep_t · (logsumexp(f_t) − f_t[y_t]), logits (B, T, V), per sample."""
    safe = targets.clamp_min(0)
    nll = torch.logsumexp(logits, dim=2) - logits.gather(2, safe.unsqueeze(2)).squeeze(2)
    return (nll * keep.to(nll.dtype)).sum(dim=1)


def _keep(batch: dict[str, Tensor]) -> Tensor:
    """Tokens that count: label ≠ −100 and (where there is an attention mask) mask = 1."""
    keep = batch["labels"] != IGNORE
    if "attention_mask" in batch:
        keep = keep & (batch["attention_mask"] == 1)
    return keep


def ref_token_ce(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Σ over counted tokens t of −log softmax(f_t)_{y_t}, per sample."""
    return _token_nll_sum(logits, batch["labels"], _keep(batch))


def ref_causal_lm(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Σ over counted tokens t ≥ 1 of −log softmax(f_{t−1})_{y_t}: the logits at t − 1 predict token t,
    so a token also needs its predicting position t − 1 unmasked (after left padding the first real
    token has only padding before it, like the first token of an unpadded sequence)."""
    keep = _keep(batch)[:, 1:]
    if "attention_mask" in batch:
        keep = keep & (batch["attention_mask"][:, :-1] == 1)
    return _token_nll_sum(logits[:, :-1], batch["labels"][:, 1:], keep)


# --------------------------------------------------------------------------- the reference
def take(batch: dict[str, Tensor], index) -> dict[str, Tensor]:
    """Rows ``index`` (an int, a slice or a list) of every tensor of a batch, batch dim kept."""
    if isinstance(index, int):
        index = slice(index, index + 1)
    return {k: v[index] for k, v in batch.items()}


def size(batch: dict[str, Tensor]) -> int:
    return len(next(iter(batch.values())))


@dataclass
class Reference:
    """θ = the tensors ``names`` of ``module`` flattened in that order; ``aliases`` maps further
    parameter names onto a studied name (a tied weight under its second name).

    ``inputs``: the batch keys the model takes as keyword arguments, or ``positional`` ones;
    ``logits``: the raw output → the tensor the loss reads; ``loss``: (logits, batch) → (B,);
    ``wd``: the weight decay of (wd/2)‖θ‖² inside every per-sample term; ``tie_weights=False``
    replaces a tied tensor under the given name only (its other names keep the module's tensor).
    """

    module: nn.Module
    names: list[str]
    loss: Callable[[Tensor, dict[str, Tensor]], Tensor]
    wd: float
    keywords: tuple[str, ...] = ()
    positional: tuple[str, ...] = ()
    logits: Callable[[object], Tensor] = lambda raw: raw  # noqa: E731
    aliases: dict[str, str] = field(default_factory=dict)
    tie_weights: bool = True

    def __post_init__(self) -> None:
        named = dict(self.module.named_parameters(remove_duplicate=False))
        missing = [k for k in self.names if k not in named]
        assert not missing, f"no such parameters {missing}"
        self.shapes = [tuple(named[k].shape) for k in self.names]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.theta = torch.cat([named[k].detach().reshape(-1) for k in self.names]).clone()

    @property
    def M(self) -> int:
        return self.theta.numel()

    def split(self, theta: Tensor) -> dict[str, Tensor]:
        parts = {k: t.view(s) for k, t, s in zip(self.names, torch.split(theta, self.sizes), self.shapes)}
        for alias, name in self.aliases.items():
            parts[alias] = parts[name]
        return parts

    def offsets(self) -> dict[str, tuple[int, int]]:
        out, o = {}, 0
        for k, s in zip(self.names, self.sizes):
            out[k] = (o, o + s)
            o += s
        for alias, name in self.aliases.items():
            out[alias] = out[name]
        return out

    def outputs(self, theta: Tensor, batch: dict[str, Tensor]) -> Tensor:
        args = tuple(batch[k] for k in self.positional)
        kwargs = {k: batch[k] for k in self.keywords}
        return self.logits(functional_call(self.module, self.split(theta), args, kwargs,
                                           tie_weights=self.tie_weights))

    def objective(self, theta: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """L(θ) = (1/n) Σ_i loss_i + (wd/2)‖θ‖²."""
        n = size(batch)
        return self.loss(self.outputs(theta, batch), batch).sum() / n + 0.5 * self.wd * theta.square().sum()

    # ------------------------------------------------------------------ matrices
    def hessian(self, batch: dict[str, Tensor]) -> Tensor:
        return torch.autograd.functional.hessian(lambda t: self.objective(t, batch), self.theta)

    def output_hessian(self, out: Tensor, sample: dict[str, Tensor]) -> Tensor:
        """Λ = ∇²_f loss(f, y) of one sample, out (1, ...), as a (K, K) matrix."""
        shape = out.shape
        return torch.autograd.functional.hessian(lambda o: self.loss(o.view(shape), sample).sum(),
                                                 out.detach().reshape(-1))

    def ggn(self, batch: dict[str, Tensor]) -> Tensor:
        """(1/n) Σ_i J_iᵀ Λ_i J_i + wd·I, J_i by torch.autograd.functional.jacobian of the
        flattened outputs of sample i."""
        n = size(batch)
        G = torch.zeros(self.M, self.M, dtype=self.theta.dtype)
        for i in range(n):
            sample = take(batch, i)
            out = self.outputs(self.theta, sample).detach()
            J = torch.autograd.functional.jacobian(lambda t: self.outputs(t, sample).reshape(-1), self.theta)
            Lam = self.output_hessian(out, sample)
            G += J.T @ Lam @ J
        return G / n + self.wd * torch.eye(self.M, dtype=G.dtype)

    # ------------------------------------------------------------------ per-sample quantities
    def gradients(self, batch: dict[str, Tensor], scalar: Callable | None = None,
                  objective_term: bool = True) -> Tensor:
        """∇_θ [scalar(f(x_i; θ̃), z_i) (+ (wd/2)‖θ‖²)] one sample at a time, (T, M); ``scalar``
        defaults to the loss."""
        scalar = scalar or self.loss
        rows = []
        for i in range(size(batch)):
            sample = take(batch, i)
            theta = self.theta.clone().requires_grad_(True)
            value = scalar(self.outputs(theta, sample), sample).sum()
            if objective_term:
                value = value + 0.5 * self.wd * theta.square().sum()
            rows.append(torch.autograd.grad(value, theta)[0])
        return torch.stack(rows)

    def losses(self, batch: dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            return self.loss(self.outputs(self.theta, batch), batch)

    # ------------------------------------------------------------------ Kronecker factors
    def kronecker_factors(self, batch: dict[str, Tensor], layers: dict[str, str]) -> dict[str, dict]:
        """K-FAC factors of Linear-like layers, one sample at a time, by forward hooks on the raw
        module: ``layers`` maps a module name to ``"linear"`` (weight (out, in)) or
        ``"transposed"`` (Hugging Face Conv1D, weight (in, out)).

        ã_t: the layer's input at position t with a trailing 1 when it has a studied bias;
        A = (1/n) Σ_n (1/T_n) Σ_t ã ãᵀ over the T_n positions of sample n (for a layer applied
        token-wise under an attention mask: its unmasked positions). b_c from eigh of our loss's output Hessian Λ_n
        (Λ = Σ_c b_c b_cᵀ); δ_{c,t} = ∂(b_cᵀ f)/∂s_t (s the layer's output);
        G = (1/n) Σ_{n,c,t} δ δᵀ; ``grads`` the per-sample (n, c) layer gradients Σ_t δ ã_tᵀ.
        ``index`` gives the flat θ position of each entry of row-major vec([W | b]).
        """
        modules = dict(self.module.named_modules())
        offs = self.offsets()
        info = {}
        for name, kind in layers.items():
            mod = modules[name]
            W = mod.weight
            out, d_w = (W.shape[1], W.shape[0]) if kind == "transposed" else (W.shape[0], W[0].numel())
            has_b = f"{name}.bias" in offs
            idx = torch.empty(out, d_w + has_b, dtype=torch.long)
            w0 = offs[f"{name}.weight"][0]
            grid = torch.arange(out * d_w)
            idx[:, :d_w] = w0 + (grid.view(d_w, out).T if kind == "transposed" else grid.view(out, d_w))
            if has_b:
                idx[:, d_w] = offs[f"{name}.bias"][0] + torch.arange(out)
            info[name] = dict(module=mod, out=out, has_b=has_b, index=idx.reshape(-1), A=0.0, G=0.0, grads=[])
        records: dict[str, tuple[Tensor, Tensor]] = {}
        handles = []
        for name, entry in info.items():
            def hook(mod, inputs, output, name=name):
                records[name] = (inputs[0].detach(), output)
                return output.clone()
            handles.append(entry["module"].register_forward_hook(hook))
        n = size(batch)
        try:
            for i in range(n):
                sample = take(batch, i)
                records.clear()
                with torch.enable_grad():
                    f = self.outputs(self.theta.clone().requires_grad_(True), sample)
                Lam = self.output_hessian(f, sample)
                mu, U = torch.linalg.eigh(0.5 * (Lam + Lam.T))
                B = (U * mu.clamp_min(0).sqrt()).T           # rows b_c with Σ_c b_c b_cᵀ = Λ
                flat_f = f.reshape(-1)
                acts = {}
                for name, entry in info.items():
                    a = records[name][0].reshape(-1, records[name][0].shape[-1])   # (T, in)
                    if entry["has_b"]:
                        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], dim=1)
                    acts[name] = a
                    if "attention_mask" in sample and len(a) == sample["attention_mask"].shape[1]:
                        a = a[sample["attention_mask"][0] == 1]  # token-wise layer: real tokens only
                    entry["A"] = entry["A"] + a.T @ a / len(a)
                outs = [records[name][1] for name in info]
                per = {name: [] for name in info}
                for c in range(B.shape[0]):
                    ds = torch.autograd.grad(flat_f @ B[c], outs, retain_graph=True)
                    for (name, entry), d in zip(info.items(), ds):
                        d = d.reshape(-1, entry["out"])                            # (T, out)
                        entry["G"] = entry["G"] + d.T @ d
                        per[name].append(d.T @ acts[name])                         # (out, d_in)
                for name, entry in info.items():
                    entry["grads"].append(torch.stack(per[name]))
        finally:
            for h in handles:
                h.remove()
        for entry in info.values():
            entry["A"], entry["G"] = entry["A"] / n, entry["G"] / n
            entry["grads"] = torch.stack(entry["grads"])                           # (n, C, out, d_in)
            del entry["module"]
        return info


def kronecker_blocks(info: dict[str, dict], corrected: bool, bases: dict[str, tuple[Tensor, Tensor]] | None = None
                     ) -> dict[str, tuple[Tensor, Tensor]]:
    """{layer: (flat index, block)}: K-FAC's G ⊗ A, or EK-FAC's Q diag(S) Qᵀ with Q = Q_G ⊗ Q_A
    (``bases[layer] = (Q_G, Q_A)``, default eigh of our factors) and S the mean squared per-sample
    layer gradient in that basis."""
    blocks = {}
    for name, e in info.items():
        if corrected:
            QG, QA = bases[name] if bases else (torch.linalg.eigh(e["G"])[1], torch.linalg.eigh(e["A"])[1])
            S = (QG.T @ e["grads"] @ QA).square().sum(dim=(0, 1)) / e["grads"].shape[0]
            Q = torch.kron(QG, QA)
            blocks[name] = (e["index"], (Q * S.reshape(1, -1)) @ Q.T)
        else:
            blocks[name] = (e["index"], torch.kron(e["G"], e["A"]))
    return blocks


def relative(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius)."""
    return ((a - b).norm() / b.norm()).item()
