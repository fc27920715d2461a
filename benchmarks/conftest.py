"""Fixtures of the benchmark suite.

* Engine timings (``test_hvp.py``): the paper's 740-parameter 1D CNN and a ~1M-parameter
  2D CNN on random data, float32.
* Accuracy and peers (``test_accuracy.py``, ``test_peers.py``): the paper CNN and a
  3,710-parameter MLP trained on the Fermi-Hubbard data in float64, with the dense oracle
  fitted once per session (``physics_problems.py``).

Run with ``OMP_NUM_THREADS=1`` (set here if unset): on a small shared machine torch's
OpenMP threads spin under contention and make timings meaningless. Every number the
suite reports is a ratio of times measured interleaved in one process.

``HBT_BENCH_MODE=quick`` (or ``HBT_BENCH_QUICK=1``) uses the minimum of 5 timed rounds and smaller sizes;
``HBT_BENCH_DEVICE`` picks the device (see ``settings.py``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from dataclasses import dataclass, field  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from physics_problems import PhysicsProblem, build_problem  # noqa: E402
from settings import DEVICE, MODE, QUICK, rounds  # noqa: E402

from scalable_hbt import Objective  # noqa: E402
from scalable_hbt.physics import PaperCNN  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

WEIGHT_DECAY = 5e-5
PHYSICS_POINTS_PER_PHASE = 100 if QUICK else 500


# ---------------------------------------------------------------------------- models
def cnn2d() -> nn.Module:
    """A 2D CNN on 3×32×32 inputs with 994,394 parameters:

    Conv2d(3→64, 3, p1) 1,792 · ReLU · MaxPool2 → Conv2d(64→128, 3, p1) 73,856 · ReLU · MaxPool2 →
    Flatten(128·8·8 = 8192) → Linear(8192→112) 917,616 · ReLU → Linear(112→10) 1,130.
    """
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 8 * 8, 112), nn.ReLU(), nn.Linear(112, 10),
    )


# ---------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """A model (eval mode, float32), its random training data and our Objective on it."""

    name: str
    model: nn.Module
    X: Tensor
    y: Tensor
    batch_size: int
    weight_decay: float
    objective: Objective
    rounds: dict[str, int] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.X)

    @property
    def num_params(self) -> int:
        return self.objective.num_params

    def loader(self) -> list[tuple[Tensor, Tensor]]:
        """The same chunks our Objective iterates over, as a list of (X, y) batches for peers."""
        return list(zip(self.X.split(self.batch_size), self.y.split(self.batch_size)))

    def info(self) -> dict:
        return {"model": self.name, "M": self.num_params, "n": self.n, "batch_size": self.batch_size,
                "weight_decay": self.weight_decay, "dtype": "float32", "device": DEVICE,
                "threads": torch.get_num_threads()}


def _rounds(full: dict[str, int]) -> dict[str, int]:
    """Rounds per benchmark: at least ``MIN_ROUNDS`` timed rounds (the minimum in quick mode,
    ``settings.rounds``) after the warm-up rounds given (the first call of a path pays one-off
    costs that would make one round an outlier)."""
    return {k: v if k.startswith("warmup") else rounds(v) for k, v in full.items()}


def _make(name: str, model: nn.Module, input_shape: tuple[int, ...], classes: int, n: int, batch_size: int,
          expect_params: int, rounds: dict[str, int]) -> Problem:
    torch.manual_seed(0)
    model = model.float().eval()
    M = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert M == expect_params, f"{name}: expected {expect_params} parameters, the model has {M}"
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, *input_shape, generator=gen).to(DEVICE)
    y = torch.randint(0, classes, (n,), generator=gen).to(DEVICE)
    model = model.to(DEVICE)
    obj = Objective(model, "cross_entropy", (X, y), weight_decay=WEIGHT_DECAY, batch_size=batch_size,
                    device=DEVICE, dtype=torch.float32, progress=False)
    return Problem(name, model, X, y, batch_size, WEIGHT_DECAY, obj, _rounds(rounds))


@pytest.fixture(scope="session")
def paper_cnn_problem() -> Problem:
    """The paper's 740-parameter CNN, n = 1000 random inputs (1, 924) in one chunk (quick: n = 250)."""
    torch.manual_seed(0)
    n = 250 if QUICK else 1000
    return _make("paper_cnn_740", PaperCNN(), (1, 924), 2, n, n, 740,
                 {"hvp": 7, "warmup_hvp": 1, "batched_8": 3, "batched_32": 2, "warmup_batched": 1,
                  "floor": 5, "influence": 3, "dense": 1})


@pytest.fixture(scope="session")
def cnn2d_problem() -> Problem:
    """The 994,394-parameter 2D CNN, n = 256 random inputs (3, 32, 32), chunks of 64 (quick: n = 64)."""
    torch.manual_seed(0)
    return _make("cnn2d_994k", cnn2d(), (3, 32, 32), 10, 64 if QUICK else 256, 64, 994_394,
                 {"hvp": 4, "warmup_hvp": 1, "batched_8": 2, "batched_32": 1, "warmup_batched": 0,
                  "floor": 3, "influence": 0, "dense": 0})


@pytest.fixture(scope="session", params=["paper_cnn_740", "cnn2d_994k"])
def problem(request) -> Problem:
    return request.getfixturevalue({"paper_cnn_740": "paper_cnn_problem", "cnn2d_994k": "cnn2d_problem"}[request.param])


@pytest.fixture(scope="session")
def dense_cache() -> dict:
    """Shares the dense fit of the 740-parameter CNN between the assembly and influence benchmarks."""
    return {}


@pytest.fixture(scope="session")
def physics_problems() -> dict[str, PhysicsProblem]:
    """Trained physics problems, built on first use and shared by the accuracy and peer benchmarks."""
    return {}


@pytest.fixture(scope="session", params=["paper_cnn", "mlp"])
def physics_problem(request, physics_problems) -> PhysicsProblem:
    """The paper CNN or the MLP on the Fermi-Hubbard data (100 points per phase in quick mode, 500 in full)."""
    name = request.param
    if name not in physics_problems:
        physics_problems[name] = build_problem(name, PHYSICS_POINTS_PER_PHASE, DEVICE)
    return physics_problems[name]


def pytest_benchmark_update_machine_info(config, machine_info):
    gpu = torch.cuda.get_device_name(0) if torch.device(DEVICE).type == "cuda" else None
    machine_info["hbt"] = {
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": DEVICE,
        "gpu": gpu,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch_num_threads": torch.get_num_threads(),
        "quick": QUICK,
        "mode": MODE,
    }
