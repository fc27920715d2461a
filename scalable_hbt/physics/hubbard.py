r"""Exact diagonalisation of the half-filled 1D spinless Fermi-Hubbard ring.

The model is eq. (6) of Dawid et al., *Hessian-based toolbox for reliable and interpretable
machine learning in physics* (2021), with J = 1 and only nearest-neighbour interaction:

.. math::

    H(V_1) = -\frac{1}{2} \sum_{j=0}^{L-1} \left(b^\dagger_j b_{j+1} + b^\dagger_{j+1} b_j\right)
             + V_1 \sum_{j=0}^{L-1} n_j n_{j+1}
             - h \sum_{j=0}^{L-1} (-1)^j n_j , \qquad j + 1 \equiv (j + 1) \bmod L .

It is written in hard-core-boson (XXZ) form: every nearest-neighbour hop, including the one
across the boundary bond L-1 <-> 0, has the matrix element exactly -1/2 and no fermionic
sign. These conventions (hopping -1/2, no boundary sign, Fock-basis order below) reproduce
the ground states the paper published; with them the Luttinger-liquid to CDW-I transition
sits at V1 = 1. The tiny staggered field h (default 1e-7) lifts the degeneracy of the two
CDW-I states deep in the ordered phase and selects the one with the even sites occupied.

Fock basis: the L-bit integers with exactly L/2 bits set, in ascending order; site j is bit
(L - 1 - j), so the binary string of a basis integer, read most-significant bit first, lists
the occupations of sites 0, 1, ..., L-1. L = 12 gives C(12, 6) = 924 states, L = 14 gives
3432.

The Hamiltonian is stoquastic (all off-diagonal elements <= 0) and connected within the
half-filled sector, so by Perron-Frobenius the ground state can be chosen with all
amplitudes >= 0; `ground_states` returns it that way, with unit 2-norm.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, overload

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from tqdm.auto import tqdm

__all__ = [
    "DEFAULT_FIELD",
    "CacheDir",
    "default_cache_dir",
    "fock_basis",
    "site_occupations",
    "hamiltonian",
    "ground_states",
    "cdw_order_parameter",
]

DEFAULT_FIELD = 1e-7
"""Default staggered symmetry-breaking field h."""

CacheDir = str | os.PathLike[str] | None | Literal[False]
"""A cache directory, None for `default_cache_dir()`, or False for no caching."""

_CACHE_ENV_VAR = "SCALABLE_HBT_CACHE"
_CACHE_FORMAT = "hubbard-ed-v1"
_INVERSE_ITERATION_MAX_STEPS = 50
_INVERSE_ITERATION_TOL = 1e-13


def _check_length(L: int) -> int:
    """Validate the chain length: an even integer >= 2 (half filling needs L/2 particles)."""
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)):
        raise ValueError(f"L must be an integer number of sites, got {L!r}.")
    L = int(L)
    if L < 2:
        raise ValueError(f"L must be at least 2 sites, got L={L}.")
    if L % 2:
        raise ValueError(
            f"L must be even for half filling (L/2 particles), got odd L={L}; use L-1 or L+1."
        )
    if L > 24:
        raise ValueError(
            f"L={L} is too large for this exact diagonalisation (C({L},{L // 2}) states); "
            "use L <= 24 (the paper uses L = 12 and 14)."
        )
    return L


def _check_field(h: float) -> float:
    h = float(h)
    if not np.isfinite(h):
        raise ValueError(f"The staggered field h must be finite, got h={h}.")
    return h


def _check_v1(v1_values: float | Sequence[float] | np.ndarray) -> np.ndarray:
    v1 = np.atleast_1d(np.asarray(v1_values, dtype=np.float64))
    if v1.ndim != 1:
        raise ValueError(
            f"v1_values must be a scalar or a 1D sequence of interaction strengths, "
            f"got an array of shape {v1.shape}; flatten it first."
        )
    bad = ~np.isfinite(v1)
    if bad.any():
        raise ValueError(
            f"v1_values must be finite; got non-finite values {v1[bad][:5].tolist()} "
            f"at positions {np.flatnonzero(bad)[:5].tolist()}."
        )
    return v1


def fock_basis(L: int) -> np.ndarray:
    """The half-filled Fock basis of an L-site chain.

    Returns the L-bit integers with exactly L/2 bits set, in ascending order, as an
    int64 array of shape (C(L, L/2),). Site j is bit (L - 1 - j) of each integer.

    >>> fock_basis(4).tolist()
    [3, 5, 6, 9, 10, 12]
    """
    return _basis(_check_length(L)).copy()


def site_occupations(L: int) -> np.ndarray:
    """Occupation numbers n_j of every basis state.

    Returns an int8 array of shape (C(L, L/2), L) whose entry [s, j] is the occupation of
    site j in the s-th state of `fock_basis(L)`, i.e. bit (L - 1 - j) of that integer.
    """
    return _occupations(_check_length(L)).copy()


@functools.lru_cache(maxsize=None)
def _basis(L: int) -> np.ndarray:
    states = np.arange(1 << L, dtype=np.int64)
    popcount = np.zeros_like(states)
    for bit in range(L):
        popcount += (states >> bit) & 1
    basis = states[popcount == L // 2]
    basis.setflags(write=False)
    return basis


@functools.lru_cache(maxsize=None)
def _occupations(L: int) -> np.ndarray:
    shifts = L - 1 - np.arange(L, dtype=np.int64)
    occ = ((_basis(L)[:, None] >> shifts[None, :]) & 1).astype(np.int8)
    occ.setflags(write=False)
    return occ


@functools.lru_cache(maxsize=None)
def _operator_parts(L: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    r"""The V1-independent pieces of H, built once per L.

    Returns (K, D_nn, D_stag): the hopping matrix
    K = -\frac12 \sum_j (b^\dagger_j b_{j+1} + h.c.) as CSR, and the diagonals
    D_nn[s] = \sum_j n_j n_{j+1} and D_stag[s] = \sum_j (-1)^j n_j.
    """
    basis = _basis(L)
    occ = _occupations(L).astype(np.int64)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    for j in range(L):
        k = (j + 1) % L
        hop_mask = occ[:, j] != occ[:, k]
        source = np.flatnonzero(hop_mask)
        flipped = basis[source] ^ ((1 << (L - 1 - j)) | (1 << (L - 1 - k)))
        rows.append(np.searchsorted(basis, flipped))
        cols.append(source)
    row = np.concatenate(rows)
    col = np.concatenate(cols)
    dim = basis.size
    kinetic = sp.csr_matrix(
        (np.full(row.size, -0.5), (row, col)), shape=(dim, dim), dtype=np.float64
    )
    kinetic.sum_duplicates()
    nn = (occ * np.roll(occ, -1, axis=1)).sum(axis=1).astype(np.float64)
    stagger = (occ * (1 - 2 * (np.arange(L) % 2))).sum(axis=1).astype(np.float64)
    for array in (kinetic.data, kinetic.indices, kinetic.indptr, nn, stagger):
        array.setflags(write=False)
    return kinetic, nn, stagger


def hamiltonian(L: int, v1: float, h: float = DEFAULT_FIELD) -> sp.csr_matrix:
    r"""The Hamiltonian of the half-filled ring in the Fock basis of `fock_basis(L)`.

    .. math::

        H = -\frac{1}{2} \sum_j (b^\dagger_j b_{j+1} + \mathrm{h.c.})
            + V_1 \sum_j n_j n_{j+1} - h \sum_j (-1)^j n_j, \quad j+1 \bmod L .

    Returns a real symmetric scipy.sparse CSR matrix of shape (C(L, L/2), C(L, L/2)).
    For L = 2 the ring has the bond (0, 1) twice, as the sum over j says.
    """
    L = _check_length(L)
    if np.ndim(v1) != 0:
        raise ValueError(
            f"hamiltonian() takes a single v1, got shape {np.shape(v1)}; "
            "use ground_states() for many values."
        )
    v1 = float(_check_v1(v1)[0])
    h = _check_field(h)
    kinetic, nn, stagger = _operator_parts(L)
    return (kinetic + sp.diags(v1 * nn - h * stagger, format="csr")).tocsr()


def default_cache_dir() -> Path:
    """Where `ground_states` caches results when no cache_dir is given.

    `$SCALABLE_HBT_CACHE` if set, else `~/.cache/scalable_hbt`.
    """
    env = os.environ.get(_CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scalable_hbt"


def _cache_path(directory: Path, L: int, v1: np.ndarray, h: float) -> Path:
    digest = hashlib.sha256()
    digest.update(f"{_CACHE_FORMAT}|L={L}|h={h!r}|".encode())
    digest.update(np.ascontiguousarray(v1, dtype="<f8").tobytes())
    return directory / f"hubbard_L{L}_n{v1.size}_{digest.hexdigest()[:24]}.npz"


def _load_cache(path: Path, L: int, v1: np.ndarray, h: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Read a cache file; None when it is missing, unreadable or for other inputs."""
    try:
        with np.load(path, allow_pickle=False) as data:
            same_inputs = (
                str(data["format"]) == _CACHE_FORMAT
                and int(data["L"]) == L
                and float(data["h"]) == h
                and np.array_equal(data["v1"], v1)
            )
            if not same_inputs:
                return None
            states = np.array(data["states"], dtype=np.float64)
            energies = np.array(data["energies"], dtype=np.float64)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if states.shape != (v1.size, _basis(L).size) or energies.shape != (v1.size,):
        return None
    return states, energies


def _save_cache(path: Path, L: int, v1: np.ndarray, h: float, states: np.ndarray,
                energies: np.ndarray) -> None:
    """Write atomically (temporary file + rename) so concurrent readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, format=_CACHE_FORMAT, L=L, h=h, v1=v1, states=states,
                     energies=energies)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _ground_state(L: int, v1: float, h: float) -> tuple[np.ndarray, float]:
    """Lowest eigenpair of H(v1): Lanczos, then inverse iteration to remove the partner state.

    Deep in CDW-I the two symmetry-broken states are split only by ~h*L, and Lanczos leaves a
    small admixture of the partner. Inverse iteration with the LU factors of
    (H - sigma I), sigma = E0 - 1e-9 * max(1, |E0|), shrinks that admixture by
    (E0 - sigma) / (E1 - sigma) per step; it runs until the vector stops changing.
    """
    H = hamiltonian(L, v1, h)
    dim = H.shape[0]
    if dim <= 2:
        energies, vectors = np.linalg.eigh(H.toarray())
        vector = vectors[:, 0]
    else:
        start = np.full(dim, 1.0 / np.sqrt(dim))
        energies, vectors = spla.eigsh(H, k=1, which="SA", v0=start, tol=0.0)
        vector = vectors[:, 0]
        shift = energies[0] - 1e-9 * max(1.0, abs(energies[0]))
        solver = spla.splu((H - shift * sp.identity(dim, format="csr")).tocsc(),
                          permc_spec="MMD_AT_PLUS_A")
        for _ in range(_INVERSE_ITERATION_MAX_STEPS):
            improved = solver.solve(vector)
            improved /= np.linalg.norm(improved)
            if improved @ vector < 0:
                improved = -improved
            change = np.linalg.norm(improved - vector)
            vector = improved
            if change < _INVERSE_ITERATION_TOL:
                break
        else:
            raise RuntimeError(
                f"Inverse iteration for the L={L}, V1={v1} ground state did not converge in "
                f"{_INVERSE_ITERATION_MAX_STEPS} steps (last change {change:.2e}); the ground "
                "state may be (nearly) degenerate: increase the staggered field h."
            )
    if vector.sum() < 0:
        vector = -vector
    vector = vector / np.linalg.norm(vector)
    return vector, float(vector @ (H @ vector))


@overload
def ground_states(L: int, v1_values: float | Sequence[float] | np.ndarray, *,
                  h: float = ..., cache_dir: CacheDir = ...,
                  progress: bool = ..., return_energies: Literal[False] = ...) -> np.ndarray: ...
@overload
def ground_states(L: int, v1_values: float | Sequence[float] | np.ndarray, *,
                  h: float = ..., cache_dir: CacheDir = ...,
                  progress: bool = ..., return_energies: Literal[True]
                  ) -> tuple[np.ndarray, np.ndarray]: ...
def ground_states(
    L: int,
    v1_values: float | Sequence[float] | np.ndarray,
    *,
    h: float = DEFAULT_FIELD,
    cache_dir: CacheDir = None,
    progress: bool = True,
    return_energies: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Ground states of `hamiltonian(L, v1, h)` for every v1 in `v1_values`.

    Args:
        L: even number of sites (>= 2).
        v1_values: scalar or 1D sequence of finite nearest-neighbour interactions V1 / J.
        h: staggered symmetry-breaking field (default 1e-7).
        cache_dir: directory for the on-disk cache; None uses `default_cache_dir()`
            (`$SCALABLE_HBT_CACHE` or `~/.cache/scalable_hbt`), False disables caching.
            The cache file is keyed by L, h and the exact float64 bytes of `v1_values`.
        progress: show a tqdm progress bar while diagonalising.
        return_energies: also return the ground-state energies.

    Returns:
        float64 array of shape (len(v1_values), C(L, L/2)): row i is the ground state at
        v1_values[i] in the basis of `fock_basis(L)`, unit 2-norm, all amplitudes >= 0
        (up to rounding), sign fixed so that the sum of amplitudes is positive. With
        `return_energies=True`, a tuple (states, energies) with energies of shape (N,).
    """
    L = _check_length(L)
    v1 = _check_v1(v1_values)
    h = _check_field(h)

    path = None
    if cache_dir is not False:
        directory = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
        path = _cache_path(directory, L, v1, h)
        cached = _load_cache(path, L, v1, h)
        if cached is not None:
            return cached if return_energies else cached[0]

    states = np.empty((v1.size, _basis(L).size), dtype=np.float64)
    energies = np.empty(v1.size, dtype=np.float64)
    for i, value in enumerate(tqdm(v1, desc=f"ED ground states L={L}", disable=not progress,
                                   leave=False)):
        states[i], energies[i] = _ground_state(L, float(value), h)

    if path is not None:
        try:
            _save_cache(path, L, v1, h, states, energies)
        except OSError as error:
            warnings.warn(
                f"Could not write the ground-state cache {path} ({error}); the result is "
                "returned uncached. Pass cache_dir=False to skip caching, or set "
                f"${_CACHE_ENV_VAR} to a writable directory.",
                RuntimeWarning,
                stacklevel=2,
            )
    return (states, energies) if return_energies else states


def cdw_order_parameter(L: int, states: np.ndarray) -> np.ndarray:
    r"""The CDW-I order parameter of each state, from the staggered density correlations.

    The paper defines O_CDW-I as "the average difference between the nearest-neighbour
    densities", zero in the Luttinger liquid and growing to 1 in CDW-I. As an operator that
    average is the staggered density

    .. math::

        M_s = \frac{1}{L} \sum_{j=0}^{L-1} (-1)^j (n_j - n_{j+1})
            = \frac{2}{L} \sum_{j=0}^{L-1} (-1)^j \left(n_j - \tfrac12\right),
        \qquad j + 1 \bmod L ,

    which is +1 on 1010... and -1 on 0101... . A finite ring does not break the symmetry
    between the two CDW-I patterns: its ground state is their symmetric superposition, so
    <M_s> (and the mean of |<n_j> - <n_{j+1}>|) is ~0 until the staggered field h of
    `ground_states` exceeds the finite-size splitting (at L = 12, h = 1e-7 only for
    V1 >~ 20). We therefore return the symmetry-invariant

    .. math::

        O_\mathrm{CDW-I} = \langle M_s^2 \rangle = \frac{4}{L} S(\pi), \qquad
        S(\pi) = \frac{1}{L} \sum_{i,j} (-1)^{i-j}
            \left\langle (n_i - \tfrac12)(n_j - \tfrac12) \right\rangle ,

    the normalised staggered structure factor. For a symmetry-broken state with densities
    1/2 +- m/2 and small fluctuations it equals m^2, the square of the paper's definition; it
    is 1 on either perfect pattern and on their superposition; 1/(L - 1) for the uniform
    superposition of all Fock states; and in the Luttinger liquid it vanishes as L grows:
    at V1 = 0 (free fermions, S(pi) = 1/2) it is exactly 2/L (1/6 at L = 12, 1/7 at L = 14).
    Across the transition it rises around V1 ~ 1-3 (L = 12: 0.17 at V1 = 0, 0.33 at 1,
    0.61 at 2, 0.81 at 3, 0.95 at 6, 0.996 at 20), steeper for larger L.

    Args:
        L: number of sites.
        states: amplitudes of shape (N, C(L, L/2)) or (C(L, L/2),) in the basis of
            `fock_basis(L)`; any global sign or norm (they are normalised here).

    Returns:
        float64 array of shape (N,) (shape () for a single 1D state), values in [0, 1].
    """
    L = _check_length(L)
    psi = np.asarray(states, dtype=np.float64)
    single = psi.ndim == 1
    psi = np.atleast_2d(psi)
    dim = _basis(L).size
    if psi.ndim != 2 or psi.shape[1] != dim:
        raise ValueError(
            f"states must have shape (N, {dim}) or ({dim},) for L={L}, got {np.shape(states)}."
        )
    weights = psi**2
    norms = weights.sum(axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("states must be finite and non-zero to have densities.")
    stagger = 1 - 2 * (np.arange(L) % 2)
    staggered_density = (2.0 / L) * ((_occupations(L) - 0.5) @ stagger)
    order = (weights / norms) @ staggered_density**2
    return order[0] if single else order


def born_samples(L: int, v1_values: Sequence[float], per_v1: int, rng: np.random.Generator,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Measurement snapshots: ``per_v1`` projective measurements of every site's occupation in the
    exact ground state at each V1, i.e. Fock states n drawn with the Born probability |ψ(n)|².

    Returns the occupations ``(N, L)`` int8 (N = per_v1 · len(v1_values)) and the V1 of each
    snapshot ``(N,)``. Cost: one exact diagonalisation per V1 (cached on disk), then sampling.
    """
    psi = ground_states(L, list(v1_values), progress=progress)
    occ = site_occupations(L)
    rows, v1 = [], []
    for value, amplitudes in zip(v1_values, psi):
        p = amplitudes**2
        rows.append(occ[rng.choice(len(occ), size=per_v1, p=p / p.sum())])
        v1.append(np.full(per_v1, float(value)))
    return np.concatenate(rows), np.concatenate(v1)
