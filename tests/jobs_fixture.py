"""A small problem for the batch-job tests: a model factory importable by job files, its
data and weights on disk, and a job file template."""

from pathlib import Path

import numpy as np
import torch
from torch import nn


def make_mlp(width: int = 5) -> nn.Module:
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))


def write_problem(folder: Path, n: int = 60, T: int = 24) -> None:
    """Seeded float64 weights (``weights.pt``), training (``train.npz``) and test (``test.pt``) data."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = make_mlp().double()
    torch.save(model.state_dict(), folder / "weights.pt")
    X, y = torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    Xt, yt = torch.randn(T, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (T,), generator=g)
    np.savez(folder / "train.npz", X=X.numpy(), y=y.numpy())
    torch.save({"X": Xt, "y": yt}, folder / "test.pt")


JOB = """
[model]
factory = "jobs_fixture:make_mlp"
state_dict = "weights.pt"

[data]
train = "train.npz"
test = "test.pt"

[objective]
loss = "cross_entropy"
weight_decay = 0.01
batch_size = 16
dtype = "float64"

[curvature]
damping = 1.0
inverse = "cg"
eigen = "lanczos"
inverse_options = {{ rtol = 1e-12 }}
eigen_options = {{ m = 8 }}

[methods]
run = {methods}
rue = {{ n_bootstrap = {bootstrap}, seed = 3 }}
lees = {{ m = 4 }}

[output]
dir = "{out}"
chunk_size = {chunk}
"""


def write_job(folder: Path, out: str = "out", chunk: int = 5,
              methods: str = '["influence", "relatif", "rue", "lees"]', bootstrap: int = 4) -> Path:
    """``folder/job.toml`` for the problem of :func:`write_problem`."""
    path = folder / "job.toml"
    path.write_text(JOB.format(out=out, chunk=chunk, methods=methods, bootstrap=bootstrap))
    return path
