"""Physics application: the paper's Fermi-Hubbard data and CNNs.

* `hubbard`: exact diagonalisation of the half-filled 1D spinless Fermi-Hubbard ring
  (ground states in the Fock basis, CDW-I order parameter, on-disk cache).
* `datasets`: the paper's labelled training and test sets, min-max scaling, and the
  sign-flip and permuted (out-of-distribution) variants.
* `ising`: seeded samples of the 2D Ising model on a periodic square lattice
  (Swendsen–Wang clusters or checkerboard Metropolis over many chains at once), with
  Onsager's and Yang's exact energy and magnetisation as references.
* `models`: the paper's 740-parameter CNN, a 1675-parameter size-invariant CNN with global
  average pooling, and a seeded training routine in two regimes (Adam + L-BFGS to a tight
  minimum, or SGD with momentum and a decreasing learning rate stopped after a fixed budget).

An application of the library: of the rest of `scalable_hbt` it uses only
`scalable_hbt.metrics` (for the figures' top-k points), and the library never imports it.
"""

from .datasets import (
    PAPER_N_SIGN_FLIPPED,
    PAPER_OOD_FRACTION,
    V1_TRANSITION,
    MinMaxScaler,
    PhaseDataset,
    evaluation_grid,
    evaluation_set,
    flip_signs,
    permute_components,
    phase_labels,
    training_grid,
    training_set,
)
from .hubbard import (
    DEFAULT_FIELD,
    born_samples,
    CacheDir,
    cdw_order_parameter,
    default_cache_dir,
    fock_basis,
    ground_states,
    hamiltonian,
    site_occupations,
)
from .ising import (
    T_CRITICAL,
    IsingSamples,
    energy_per_site,
    magnetisation_per_site,
    onsager_energy_per_site,
    sample_ising,
    spontaneous_magnetisation,
)
from .models import (
    GAP_CNN_RECIPE,
    PAPER_CNN_RECIPE,
    TIGHT_RECIPE,
    Optimizer,
    PaperCNN,
    Schedule,
    SizeInvariantCNN,
    TrainingRecipe,
    TrainingResult,
    count_parameters,
    paper_weight_decay,
    train_model,
)

__all__ = [
    "DEFAULT_FIELD",
    "born_samples",
    "CacheDir",
    "cdw_order_parameter",
    "default_cache_dir",
    "fock_basis",
    "ground_states",
    "hamiltonian",
    "site_occupations",
    "PAPER_N_SIGN_FLIPPED",
    "PAPER_OOD_FRACTION",
    "V1_TRANSITION",
    "MinMaxScaler",
    "PhaseDataset",
    "evaluation_grid",
    "evaluation_set",
    "flip_signs",
    "permute_components",
    "phase_labels",
    "training_grid",
    "training_set",
    "T_CRITICAL",
    "IsingSamples",
    "energy_per_site",
    "magnetisation_per_site",
    "onsager_energy_per_site",
    "sample_ising",
    "spontaneous_magnetisation",
    "Optimizer",
    "PaperCNN",
    "Schedule",
    "SizeInvariantCNN",
    "GAP_CNN_RECIPE",
    "PAPER_CNN_RECIPE",
    "TIGHT_RECIPE",
    "TrainingRecipe",
    "TrainingResult",
    "count_parameters",
    "paper_weight_decay",
    "train_model",
]
