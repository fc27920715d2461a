"""Workload 3: a ResNet with BatchNorm classifying phases of the 2D Ising model.

Data (``scalable_hbt.physics.ising``, Swendsen–Wang, seeded, L = 32, J = 1): configurations at
temperatures spread over [1.2, 3.6] around T_c ≈ 2.269, labelled ordered (T < T_c, class 0) or
disordered (class 1) — the "machine learning phases of matter" setting. The training and test
temperatures leave out the open band (2.2, 2.35) around T_c, its edges included, so the
hardest trained points sit where the 32 × 32 lattice is already half-disordered; configurations
from inside the band are the first kind of out-of-distribution input (critical clusters the
network never saw). The other two are corrupted test configurations: 20 % of the spins
flipped at random, and Gaussian noise of σ = 0.5 added (spins no longer ±1). Training, test
and OOD configurations come from independent chains (three seeds).

Model: a ResNet (zero padding, as usual; circular padding would respect the torus, but
kronfluence builds its convolution patches with zero padding whatever the layer's mode, so a
circular network would hand it wrong per-sample gradients): a 3×3 stem of width w, three
basic blocks (two 3×3 convolutions, BatchNorm, ReLU, projection shortcut) of widths 2w, 4w,
8w at strides 2 (32 → 16 → 8 → 4), global average pooling and a linear head:
1,176·w² + 111·w + 2 parameters, float32.

Sizes (``SIZES``): ``full`` w = 32 (1,207,778 parameters), n = 5,000 training configurations
(250 at each of 20 temperatures), 200 test; ``quick`` w = 8 (76,154 parameters), n = 2,000
(100 per temperature), 100 test; ``tiny`` (CI) w = 4 (19,262 parameters), L = 16, n = 200
(10 temperatures), 20 test.

Training (``ResNetRecipe``), on mini-batches placed by content (``training.content_batches``):
Adam in train mode (BatchNorm normalises by batch statistics and updates its running averages),
learning rate decaying linearly to 0; then ``frozen_epochs`` of plain SGD with the model in eval
mode (BatchNorm uses the frozen running statistics, its affine parameters still train), rate
``frozen_lr`` decaying linearly to 0, on the eval-mode objective L(θ) = (1/n) Σ CE + (wd/2)‖θ‖²
whose curvature the library takes. Every warm-started retrain (leave-one-out, RUE's bootstrap) is
the second phase alone from θ̃. The regulariser is in the loss (not decoupled), so
``weight_decay`` is the objective's.

Why plain SGD with a small rate for the second phase: a retrain's response to removing z_r must
be the response to its gradient, not an optimiser's echo of it. A plain SGD step with η·λ_max < 1
propagates a perturbation by I − ηH ⪰ 0, so the response to −g_r/n keeps its sign; Adam restarted
from θ̃ (per-coordinate normalisation), heavy-ball momentum (an underdamped oscillator kicked
once per epoch, when z_r's batch comes) and rates with η·λ > 1 on some mini-batch do not. The
batches are placed by content (``training.content_batches``) and each step divides the batch's
summed loss by the nominal batch size, so a leave-one-out retrain sees the base retrain's steps
less z_r's term and nothing else (a per-batch mean would also reweight z_r's batch-mates). The
measurements behind these choices: ``benchmarks/GROUND_TRUTH_PROTOCOL.md`` (``protocol.py``).

Configurations are cached as one ``.npz`` per size under the folder the caller names (default
``benchmarks/ground_truth_cache/ising/``), keyed by every sampling setting.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from scalable_hbt.physics.ising import T_CRITICAL, sample_ising

from .training import content_batches, objective_value
from .workload import Workload

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / "ground_truth_cache" / "ising"
EXCLUDED_BAND = (2.2, 2.35)
"""Temperatures never trained on (around T_c); the OOD temperatures lie inside."""
OOD_TEMPERATURES = (2.24, 2.269, 2.3)
FLIP_RATE = 0.2
NOISE_SIGMA = 0.5


@dataclass(frozen=True)
class IsingSize:
    """Every setting one size fixes: lattice, sampling, data set sizes, width, training."""

    L: int
    n_temperatures: int
    train_per_temperature: int
    test_per_temperature: int
    ood_per_temperature: int
    width: int
    epochs: int
    frozen_epochs: int
    per_chain: int = 5
    equilibration: int = 100
    spacing: int = 10


SIZES = {
    "tiny": IsingSize(L=16, n_temperatures=10, train_per_temperature=20, test_per_temperature=2,
                      ood_per_temperature=5, width=4, epochs=6, frozen_epochs=2, per_chain=5, equilibration=30,
                      spacing=5),
    "quick": IsingSize(L=32, n_temperatures=20, train_per_temperature=100, test_per_temperature=5,
                       ood_per_temperature=20, width=8, epochs=6, frozen_epochs=5),
    "full": IsingSize(L=32, n_temperatures=20, train_per_temperature=250, test_per_temperature=10,
                      ood_per_temperature=50, width=32, epochs=10, frozen_epochs=5),
}
TRAINING_FIELDS = ("width", "epochs", "frozen_epochs")
"""The fields of ``IsingSize`` the configurations do not depend on (left out of the data cache's key)."""
WEIGHT_DECAY = 5e-4


def temperatures(count: int) -> np.ndarray:
    """``count`` temperatures evenly spaced over [1.2, 3.6] outside the open ``EXCLUDED_BAND``:
    half from 1.2 up to its lower edge, half from its upper edge up to 3.6 (edges included), so
    both phases are equally represented."""
    below = np.linspace(1.2, EXCLUDED_BAND[0], count // 2)
    above = np.linspace(EXCLUDED_BAND[1], 3.6, count - count // 2)
    return np.concatenate([below, above])


# ---------------------------------------------------------------------------- data and cache
def _sample(size: IsingSize, temps, per_temperature: int, seed: int):
    s = sample_ising(size.L, list(temps), per_temperature, seed, per_chain=min(size.per_chain, per_temperature),
                     equilibration=size.equilibration, spacing=size.spacing, progress=True)
    return s.configurations.numpy(), s.labels.numpy(), s.temperatures.numpy()


def ising_data(size: str = "quick", cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """Training, test and OOD configurations of one size, sampled once and cached as npz.

    Keys: ``train_X`` (n, 1, L, L) float32, ``train_y`` (n,) int64, ``train_T`` (n,), likewise
    ``test_*``; ``ood_X`` (critical band, then spin-flipped, then noisy test configurations) and
    ``ood_kind`` (0 critical, 1 flipped, 2 noisy).
    """
    settings = _size(size)
    folder = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    sampling = {k: v for k, v in asdict(settings).items() if k not in TRAINING_FIELDS}
    key = hashlib.sha256(json.dumps([sampling, EXCLUDED_BAND, OOD_TEMPERATURES, FLIP_RATE, NOISE_SIGMA],
                                    sort_keys=True).encode()).hexdigest()[:12]
    path = folder / f"ising_{size}_{key}.npz"
    if path.exists():
        with np.load(path) as data:
            return dict(data)
    temps = temperatures(settings.n_temperatures)
    train_X, train_y, train_T = _sample(settings, temps, settings.train_per_temperature, seed=0)
    test_X, test_y, test_T = _sample(settings, temps, settings.test_per_temperature, seed=1)
    band_X, _, _ = _sample(settings, OOD_TEMPERATURES, settings.ood_per_temperature, seed=2)
    rng = np.random.default_rng(3)
    flipped = test_X * np.where(rng.random(test_X.shape) < FLIP_RATE, -1.0, 1.0).astype(np.float32)
    noisy = test_X + NOISE_SIGMA * rng.standard_normal(test_X.shape).astype(np.float32)
    data = dict(train_X=train_X, train_y=train_y, train_T=train_T, test_X=test_X, test_y=test_y, test_T=test_T,
                ood_X=np.concatenate([band_X, flipped, noisy]),
                ood_kind=np.repeat([0, 1, 2], [len(band_X), len(flipped), len(noisy)]))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **data)
    tmp.replace(path)
    return data


def _size(size: str) -> IsingSize:
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}; got {size!r}.")
    return SIZES[size]


# ---------------------------------------------------------------------------- the model
def _conv3x3(c_in: int, c_out: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), shortcut = 1×1 conv + BN (stride s)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = _conv3x3(c_out, c_out, 1), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class IsingResNet(nn.Module):
    """Stem (width w) → blocks of widths 2w, 4w, 8w at stride 2 → global average pool → 2 logits.

    Input (N, 1, L, L) spins, output (N, 2) logits; 1,176·w² + 111·w + 2 parameters (w = 32:
    1,207,778). Cost per configuration ≈ 56·(L/2)²·w² multiply-adds per block, three blocks.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv3x3(1, w, 1), nn.BatchNorm2d(w), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 4 * w, 2), BasicBlock(4 * w, 8 * w, 2))
        self.head = nn.Linear(8 * w, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(-2, -1)))


# ---------------------------------------------------------------------------- training
FROZEN_OPTIMIZERS = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}
"""The second phase's optimisers: plain SGD (the default, see the module docstring) and the two
the retraining-protocol check (``protocol.py``) compares it with."""


@dataclass(frozen=True)
class ResNetRecipe:
    """Seeded training in two phases (module docstring); calling it is a ``Trainer``.

    ``frozen_lr`` must keep η·λ_max < 1 for the curvature of every mini-batch of the eval-mode
    objective, not only for the full-data H.

    Cost: (epochs + frozen_epochs) · n / batch_size mini-batch steps.
    """

    weight_decay: float
    epochs: int
    frozen_epochs: int
    lr: float = 3e-3
    frozen_lr: float = 0.008
    frozen_optimizer: str = "sgd"
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.frozen_optimizer not in FROZEN_OPTIMIZERS:
            raise ValueError(f"frozen_optimizer must be one of {sorted(FROZEN_OPTIMIZERS)}; got "
                             f"{self.frozen_optimizer!r}.")

    @property
    def warm(self) -> ResNetRecipe:
        """The eval-mode SGD phase alone: training continued from the model's current parameters."""
        return replace(self, epochs=0)

    def _phase(self, model: nn.Module, X: Tensor, y: Tensor, epochs: int, optimizer: torch.optim.Optimizer,
               seed: int) -> None:
        steps = max(epochs * -(-len(y) // self.batch_size), 1)
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: max(1.0 - k / steps, 0.0))
        for epoch in range(epochs):
            for index in content_batches(X, self.batch_size, seed, epoch):
                if model.training and len(index) < 2:
                    continue                    # BatchNorm's batch statistics need two points
                optimizer.zero_grad()
                objective_value(model, X[index], y[index], self.weight_decay, self.batch_size).backward()
                optimizer.step()
                decay.step()

    def __call__(self, model: nn.Module, X: Tensor, y: Tensor, seed: int) -> nn.Module:
        if len(X) != len(y) or len(y) < 2:
            raise ValueError(f"training needs one label per input and at least two points; got {len(X)} inputs "
                             f"and {len(y)} labels.")
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.epochs > 0:
                self._phase(model.train(), X, y, self.epochs, torch.optim.Adam(params, lr=self.lr), seed)
            if self.frozen_epochs > 0:
                optimizer = FROZEN_OPTIMIZERS[self.frozen_optimizer](params, self.frozen_lr)
                self._phase(model.eval(), X, y, self.frozen_epochs, optimizer, seed + 1)
        model.zero_grad(set_to_none=True)
        return model.eval()


# ---------------------------------------------------------------------------- the workload
def workload(size: str = "quick", cache_dir: str | Path | None = None) -> Workload:
    """Workload 3 at ``size`` ∈ {"tiny", "quick", "full"} (see the module docstring)."""
    settings = _size(size)
    data = {k: torch.from_numpy(v) for k, v in ising_data(size, cache_dir).items()}
    recipe = ResNetRecipe(WEIGHT_DECAY, settings.epochs, settings.frozen_epochs)
    width = settings.width

    def make_model() -> nn.Module:
        return IsingResNet(width)

    n_params = sum(p.numel() for p in make_model().parameters())
    kinds = np.bincount(data["ood_kind"].numpy(), minlength=3)
    return Workload(
        "ising_resnet", make_model, data["train_X"], data["train_y"].long(), data["test_X"], data["test_y"].long(),
        recipe, weight_decay=WEIGHT_DECAY, ood_X=data["ood_X"],
        description=(f"ResNet with BatchNorm (width {width}, {n_params:,} parameters) on {settings.L}×{settings.L} "
                     f"Ising configurations (Swendsen–Wang, T_c = {T_CRITICAL:.3f}), n = {len(data['train_y'])}, "
                     f"T = {len(data['test_y'])}, {settings.n_temperatures} temperatures in [1.2, 3.6] outside "
                     f"{EXCLUDED_BAND}; OOD: {kinds[0]} at T ∈ {OOD_TEMPERATURES}, {kinds[1]} with "
                     f"{FLIP_RATE:.0%} spins flipped, {kinds[2]} with noise σ = {NOISE_SIGMA}"),
        warm_train=recipe.warm)
