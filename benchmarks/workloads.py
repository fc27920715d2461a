"""The HVP workloads measured against the peers beyond the paper's CNN: a 2D CNN with pooling
and one transformer block of a small GPT-2 (``test_hvp_workloads.py``).

Each workload bundles our :class:`~scalable_hbt.Objective` (float32, random data, the model at
its seeded initialisation), the same chunks of data for the peers, and — for the transformer,
where a peer's agreement cannot be taken for granted — a brute-force reference built from the
raw module: ``jvp(grad(L))`` with ``torch.func.functional_call`` on the studied parameters.

* ``cnn2d_pool_282k``: Conv2d(3→32, 3, p1) · Tanh · MaxPool2 → Conv2d(32→64, 3, p1) · Tanh ·
  AvgPool2 → Flatten(64·8·8) → Linear(4096→64) · Tanh → Linear(64→10); 282,250 parameters,
  n = 512 inputs 3×32×32, chunks of 128, cross-entropy.
* ``gpt2_block_50k``: GPT-2 (n_embd 64, 4 heads, 2 layers, vocabulary 128, built from a config,
  no download), θ = ``transformer.h.1.*`` (49,984 parameters), n = 64 sequences of 32 tokens,
  chunks of 32, causal-LM token loss summed over a sequence (``"causal_lm"``). Our Objective
  runs the model's default attention; the peer and the reference a copy with eager attention.

``quick=True`` builds a workload with an eighth (CNN) or half (GPT-2) of the data, in one chunk:
the k = 32 product benchmark uses it in quick mode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from scalable_hbt import Objective

WEIGHT_DECAY = 5e-5


@dataclass
class Workload:
    """One model and data set, with our objective and what the peers need.

    ``peer_data``: the chunks as (inputs, targets) pairs in the peers' convention;
    ``peer_model``: the module (mapping inputs to 2D logits) the peers differentiate;
    ``peer_params``: its studied parameters (same order as our θ);
    ``peer_loss``: the peers' loss on one chunk; ``peer_scale``: the factor that turns the
    peer's Hessian (without weight decay) into ours, H_ours = peer_scale · H_peer + wd·I.
    ``unsupported``: peer name → why it cannot take this workload.
    """

    name: str
    description: str
    objective: Objective
    peer_model: nn.Module
    peer_params: list[nn.Parameter]
    peer_data: list[tuple[Any, Tensor]]
    peer_loss: nn.Module
    peer_scale: float
    batch_size_fn: Callable[[Any], int] | None = None
    reference: Callable[[Tensor], Tensor] | None = None
    unsupported: dict[str, str] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.objective.n

    def info(self) -> dict[str, Any]:
        obj = self.objective
        return {"model": self.name, "description": self.description, "M": obj.num_params, "n": obj.n,
                "batch_size": obj.batch_size, "weight_decay": obj.weight_decay, "dtype": "float32",
                "threads": torch.get_num_threads()}


def pooled_cnn2d() -> nn.Module:
    """The 282,250-parameter 2D CNN with max and average pooling (see the module docstring)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 64), nn.Tanh(), nn.Linear(64, 10),
    )


def cnn2d_pool_workload(quick: bool = False) -> Workload:
    """n = 512 in chunks of 128 (``quick``: n = 64, one chunk)."""
    n, batch_size = (64, 64) if quick else (512, 128)
    torch.manual_seed(0)
    model = pooled_cnn2d().float().eval()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    obj = Objective(model, "cross_entropy", (X, y), weight_decay=WEIGHT_DECAY, batch_size=batch_size,
                    dtype=torch.float32, progress=False)
    peer = copy.deepcopy(model).eval()
    return Workload("cnn2d_pool_282k", "Conv2d×2 (MaxPool, AvgPool), Linear×2, Tanh; 3×32×32 inputs, 10 classes",
                    obj, peer, [p for p in peer.parameters()], list(zip(X.split(batch_size), y.split(batch_size))),
                    nn.CrossEntropyLoss(), 1.0)


class _ShiftedLogits(nn.Module):
    """A causal LM as a classifier of tokens: logits at positions 0..T−2 as (B·(T−1), V)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        logits = self.lm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return logits[:, :-1].reshape(-1, logits.shape[-1])


def gpt2_block_workload(quick: bool = False) -> Workload:
    """n = 64 sequences of 32 tokens in chunks of 32 (``quick``: n = 32, one chunk)."""
    n, seq_len, batch_size = (32, 32, 32) if quick else (64, 32, 32)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vocab = 128
    cfg = GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).float().eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    obj = Objective(model, "causal_lm", {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()},
                    params=["transformer.h.1.*"], weight_decay=WEIGHT_DECAY, batch_size=batch_size,
                    dtype=torch.float32, progress=False)

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    for p in eager.parameters():
        p.requires_grad_(False)
    names = [k for k, _ in eager.named_parameters() if k.startswith("transformer.h.1.")]
    studied = dict(eager.named_parameters())
    params = [studied[k].requires_grad_(True) for k in names]
    wrapped = _ShiftedLogits(eager)
    chunks = [({"input_ids": i, "attention_mask": m}, i[:, 1:].reshape(-1))
              for i, m in zip(ids.split(batch_size), mask.split(batch_size))]
    shapes = [p.shape for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def objective(t: Tensor) -> Tensor:
        """L(θ) = (1/n) Σ_sequences Σ_tokens CE + (wd/2)‖θ‖², on the eager copy via functional_call."""
        tensors = dict(zip(names, (c.view(s) for c, s in zip(t.split([s.numel() for s in shapes]), shapes))))
        total = t.new_zeros(())
        for inputs, targets in chunks:
            logits = functional_call(wrapped, {f"lm.{k}": v for k, v in tensors.items()}, (inputs,))
            total = total + nn.functional.cross_entropy(logits, targets, reduction="sum")
        return total / n + 0.5 * WEIGHT_DECAY * t.pow(2).sum()

    def reference(v: Tensor) -> Tensor:
        return jvp(grad(objective), (theta,), (v,))[1]

    return Workload("gpt2_block_50k",
                    f"GPT-2 (n_embd 64, 4 heads, 2 layers, vocab {vocab}), θ = transformer.h.1.*, {n} sequences "
                    f"× {seq_len} tokens, causal-LM token loss",
                    obj, wrapped, params, chunks, nn.CrossEntropyLoss(reduction="sum"), 1.0 / n,
                    batch_size_fn=lambda inputs: inputs["input_ids"].shape[0], reference=reference,
                    unsupported={"pyhessian": "PyHessian takes tensor inputs only (its dataloader_hv_product "
                                              "calls inputs.size(0)) and every parameter of the model"})


WORKLOADS: dict[str, Callable[..., Workload]] = {"cnn2d_pool_282k": cnn2d_pool_workload,
                                                "gpt2_block_50k": gpt2_block_workload}
