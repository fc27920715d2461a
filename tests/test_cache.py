"""The on-disk curvature cache: reuse, invalidation, corruption detection, round-trips."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from scalable_hbt import Objective, Toolbox
from scalable_hbt.cache import CacheWarning, CurvatureCache, cacheable, data_digest, fingerprint, fit_or_load
from scalable_hbt.curvature import (CGCurvature, DenseCurvature, EKFACCurvature, KFACCurvature, LanczosCurvature,
                                    LiSSACurvature, LowRankCurvature, make_backend)
from scalable_hbt.operators import HessianOperator

from conftest import brute_force_gradients, brute_force_hessian, make_problem, training_tensors


def _fit(obj: Objective, backend, cache: CurvatureCache) -> tuple[bool, HessianOperator]:
    hessian = HessianOperator(obj)
    loaded = fit_or_load(backend, hessian, cache)
    return loaded, hessian


def _key(obj: Objective, backend) -> str:
    """The key fit_or_load uses: the objective, the backend's fit settings, the operator's settings."""
    return fingerprint(obj, backend, HessianOperator(obj).settings())


def _rhs(obj: Objective, k: int = 3) -> torch.Tensor:
    return torch.randn(obj.num_params, k, generator=torch.Generator().manual_seed(1), dtype=obj.dtype)


# ------------------------------------------------------------------ reuse: no HVPs, bit-identical results
@pytest.mark.parametrize("name,options", [("dense", {}), ("lanczos", {"m": 4}), ("lowrank", {"m": 4}),
                                          ("kfac", {}), ("ekfac", {}), ("lissa", {"deflate": 2, "depth": 30, "warn_residual": None}),
                                          ("cg", {})])
def test_second_fit_loads_bit_for_bit(tmp_path, name, options):
    obj = make_problem("mlp")
    cache = CurvatureCache(tmp_path)
    role = "eigen" if name == "lanczos" else "inverse"
    first = make_backend(name, role, options)
    loaded, h1 = _fit(obj, first, cache)
    assert not loaded and (h1.num_hvps > 0 or name in ("kfac", "ekfac", "cg"))
    assert (cache.entry(_key(obj, make_backend(name, role, options)), first)
            / "tensors.safetensors").is_file()

    second = make_backend(name, role, options)
    if name in ("kfac", "ekfac"):  # K-FAC uses no HVPs: make sure no pass over the data happens either
        second._pass = lambda *a, **k: pytest.fail("K-FAC recomputed its factors instead of loading them")
    loaded, h2 = _fit(obj, second, cache)
    assert loaded and second.fitted
    assert h2.num_hvps == 0
    V = _rhs(obj)
    if name != "lanczos":
        before = h2.num_hvps
        assert torch.equal(first.solve(V, 0.2), second.solve(V, 0.2))
        if name != "cg" and name != "lissa":
            assert h2.num_hvps == before
    if name in ("dense", "lanczos", "lowrank"):
        for a, b in zip(first.eigh(3), second.eigh(3)):
            assert torch.equal(a, b)
        assert first.min_eigenvalue() == second.min_eigenvalue()
    if name in ("kfac", "ekfac"):
        G = V.T
        assert torch.equal(first.inverse_norms(G, 0.2), second.inverse_norms(G, 0.2))
        assert torch.equal(first.dense_matrix(), second.dense_matrix())
    assert cache.hits == 1 and cache.misses == 1


def test_kfac_cnn_with_fallback_roundtrip(tmp_path):
    """Conv layers and a fallback diagonal (a bare parameter-free layer is fine; use BatchNorm)."""
    obj = make_problem("cnn")
    cache = CurvatureCache(tmp_path)
    a, b = EKFACCurvature(), EKFACCurvature()
    assert not _fit(obj, a, cache)[0]
    assert _fit(obj, b, cache)[0]
    V = _rhs(obj)
    assert torch.equal(a.solve(V, 0.1), b.solve(V, 0.1))
    assert [l.name for l in a.layers] == [l.name for l in b.layers]


def test_cg_with_backend_preconditioner(tmp_path):
    obj = make_problem("mlp")
    cache = CurvatureCache(tmp_path)
    a = CGCurvature(preconditioner=KFACCurvature())
    assert cacheable(a)
    assert not _fit(obj, a, cache)[0]
    b = CGCurvature(preconditioner=KFACCurvature())
    assert _fit(obj, b, cache)[0] and b.preconditioner.fitted
    V = _rhs(obj)
    assert torch.equal(a.solve(V, 0.2), b.solve(V, 0.2))
    assert not cacheable(CGCurvature(preconditioner=lambda R, d: R))


# ------------------------------------------------------------------ the Toolbox flow
def test_toolbox_second_fit_uses_no_hvps(tmp_path):
    obj = make_problem("mlp")
    X, y = (t[:5] for t in training_tensors(obj))
    tb1 = Toolbox(obj, damping=0.2, inverse="dense", eigen="lanczos", eigen_options={"m": 3},
                        cache_dir=tmp_path).fit()
    assert tb1.operator.num_hvps > 0
    tb2 = Toolbox(obj, damping=0.2, inverse="dense", eigen="lanczos", eigen_options={"m": 3},
                        cache_dir=tmp_path).fit()
    assert tb2.operator.num_hvps == 0
    assert torch.equal(tb1.influence(X, y), tb2.influence(X, y))
    # what was loaded is the right curvature: the influence of the brute-force H_δ
    H = brute_force_hessian(obj)
    Xr, yr = training_tensors(obj)
    Gt, Gr = brute_force_gradients(obj, X, y), brute_force_gradients(obj, Xr, yr)
    ref = Gt @ torch.linalg.solve(H + 0.2 * torch.eye(len(H), dtype=H.dtype), Gr.T) / obj.n
    torch.testing.assert_close(tb2.influence(X, y), ref, rtol=1e-9, atol=1e-12)
    assert torch.equal(tb1.extrapolation_score(X, m=3), tb2.extrapolation_score(X, m=3))
    assert tb2.operator.num_hvps == 0
    # "auto" damping from the cached dense spectrum: still no HVPs
    tb3 = Toolbox(obj, damping="auto", inverse="dense", eigen="dense", cache_dir=tmp_path).fit()
    tb4 = Toolbox(obj, damping="auto", inverse="dense", eigen="dense", cache_dir=tmp_path).fit()
    assert tb4.operator.num_hvps == 0 and tb3.damping == tb4.damping
    # the damping is not read by fit: δ = 0.2 and "auto" share the dense entry (the eigendecomposition is
    # not recomputed when δ changes)
    assert tb3.operator.num_hvps == 0
    assert len(list(tmp_path.iterdir())) == 2  # dense, lanczos; no temp folders left


# ------------------------------------------------------------------ invalidation: every change, a new key
def test_any_change_gives_a_new_key():
    base_obj = make_problem("mlp")
    base = fingerprint(base_obj, DenseCurvature(), {"damping": 0.2})
    assert base == fingerprint(make_problem("mlp"), DenseCurvature(), {"damping": 0.2})  # deterministic

    keys = {"base": base}
    # parameters: one entry of θ̃ nudged by one ulp-ish
    obj = make_problem("mlp")
    with torch.no_grad():
        next(obj.model.parameters()).view(-1)[0] += 1e-7  # a few ulps of the float32 module's weight
    keys["theta"] = fingerprint(Objective(obj.model, "cross_entropy", (obj.train._X, obj.train._y),
                                          weight_decay=1e-2, batch_size=16, dtype=torch.float64, progress=False),
                                DenseCurvature(), {"damping": 0.2})
    # data: one input changed, then one target changed
    X, y = base_obj.train._X.clone(), base_obj.train._y.clone()
    X2 = X.clone()
    X2[7, 2] += 1e-9
    y2 = y.clone()
    y2[3] = (y2[3] + 1) % 3

    def rebuild(X, y, wd=1e-2, bs=16):
        return Objective(base_obj.model, "cross_entropy", (X, y), weight_decay=wd, batch_size=bs,
                         dtype=torch.float64, progress=False)

    keys["inputs"] = fingerprint(rebuild(X2, y), DenseCurvature(), {"damping": 0.2})
    keys["targets"] = fingerprint(rebuild(X, y2), DenseCurvature(), {"damping": 0.2})
    keys["weight_decay"] = fingerprint(rebuild(X, y, wd=2e-2), DenseCurvature(), {"damping": 0.2})
    keys["damping"] = fingerprint(base_obj, DenseCurvature(), {"damping": 0.3})
    keys["damping_auto"] = fingerprint(base_obj, DenseCurvature(), {"damping": "auto"})
    keys["backend"] = fingerprint(base_obj, LanczosCurvature(), {"damping": 0.2})
    keys["backend_setting"] = fingerprint(base_obj, DenseCurvature(chunk=7), {"damping": 0.2})
    keys["lanczos_m"] = fingerprint(base_obj, LanczosCurvature(m=5), {"damping": 0.2})
    keys["lanczos_tol"] = fingerprint(base_obj, LanczosCurvature(tol=1e-9), {"damping": 0.2})
    keys["lowrank"] = fingerprint(base_obj, LowRankCurvature(), {"damping": 0.2})
    keys["ekfac"] = fingerprint(base_obj, EKFACCurvature(), {"damping": 0.2})
    keys["kfac"] = fingerprint(base_obj, KFACCurvature(), {"damping": 0.2})
    keys["kfac_setting"] = fingerprint(base_obj, KFACCurvature(unsupported="diagonal"), {"damping": 0.2})
    keys["lissa_seed"] = fingerprint(base_obj, LiSSACurvature(seed=1), {"damping": 0.2})
    keys["lissa"] = fingerprint(base_obj, LiSSACurvature(), {"damping": 0.2})
    keys["dtype"] = fingerprint(Objective(base_obj.model, "cross_entropy", (X, y), weight_decay=1e-2, batch_size=16,
                                          dtype=torch.float32, progress=False), DenseCurvature(), {"damping": 0.2})
    keys["loss"] = fingerprint(Objective(base_obj.model, lambda o, t: torch.nn.functional.cross_entropy(
        o, t, reduction="none"), (X, y), weight_decay=1e-2, batch_size=16, dtype=torch.float64, progress=False),
        DenseCurvature(), {"damping": 0.2})
    keys["batch_size"] = fingerprint(rebuild(X, y, bs=8), DenseCurvature(), {"damping": 0.2})
    keys["model_structure"] = fingerprint(
        Objective(torch.nn.Sequential(*[m for m in base_obj.model][:1], torch.nn.ReLU(), base_obj.model[2]),
                  "cross_entropy", (X, y), weight_decay=1e-2, batch_size=16, dtype=torch.float64, progress=False),
        DenseCurvature(), {"damping": 0.2})
    assert len(set(keys.values())) == len(keys), {k: v[:8] for k, v in keys.items()}
    # irrelevant to the result: the progress flag
    assert fingerprint(base_obj, LiSSACurvature(progress=False)) == fingerprint(base_obj, LiSSACurvature(progress=True))


def test_data_hash_is_streamed_and_chunk_independent():
    a = make_problem("mlp", batch_size=16)
    b = make_problem("mlp", batch_size=7)
    assert data_digest(a) == data_digest(b)
    ds = torch.utils.data.TensorDataset(a.train._X, a.train._y)
    c = Objective(a.model, "cross_entropy", ds, weight_decay=1e-2, batch_size=16, dtype=torch.float64, progress=False)
    assert data_digest(c) == data_digest(a)


def test_changed_setting_recomputes(tmp_path):
    obj = make_problem("mlp")
    cache = CurvatureCache(tmp_path)
    assert not _fit(obj, LanczosCurvature(m=3), cache)[0]
    loaded, h = _fit(obj, LanczosCurvature(m=4), cache)
    assert not loaded and h.num_hvps > 0
    assert _fit(obj, LanczosCurvature(m=4), cache)[0]


# ------------------------------------------------------------------ corruption: detected, warned, recomputed
def _entry(tmp_path, obj, backend_factory):
    cache = CurvatureCache(tmp_path)
    ref = backend_factory()
    _fit(obj, ref, cache)
    folder = cache.entry(_key(obj, backend_factory()), ref)
    return cache, ref, folder


def _recompute_with_warning(cache, obj, backend_factory, match):
    again = backend_factory()
    with pytest.warns(CacheWarning, match=match):
        loaded, h = _fit(obj, again, cache)
    assert not loaded and again.fitted
    return again, h


def test_truncated_tensor_file_is_detected_and_recomputed(tmp_path):
    obj = make_problem("mlp")
    cache, ref, folder = _entry(tmp_path, obj, DenseCurvature)
    path = folder / "tensors.safetensors"
    os.truncate(path, path.stat().st_size // 2)
    again, h = _recompute_with_warning(cache, obj, DenseCurvature, "tensors.safetensors.*truncated")
    assert h.num_hvps > 0
    assert torch.equal(again.eigenvalues, ref.eigenvalues)
    # the bad entry was overwritten: the next fit loads cleanly
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        assert _fit(obj, DenseCurvature(), cache)[0]


def test_truncated_file_with_matching_manifest_size_fails_to_open(tmp_path):
    """Truncation that also rewrote the recorded size and checksum: safetensors itself refuses it."""
    obj = make_problem("mlp")
    cache, ref, folder = _entry(tmp_path, obj, LanczosCurvature)
    path = folder / "tensors.safetensors"
    os.truncate(path, path.stat().st_size // 2)
    manifest = json.loads((folder / "manifest.json").read_text())
    import hashlib

    manifest["files"]["tensors.safetensors"] = {"bytes": path.stat().st_size,
                                                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _recompute_with_warning(cache, obj, LanczosCurvature, "tensors.safetensors.*safetensors")


def test_modified_manifest_checksum_is_detected(tmp_path):
    obj = make_problem("mlp")
    cache, ref, folder = _entry(tmp_path, obj, KFACCurvature)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["tensors.safetensors"]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    again, _ = _recompute_with_warning(cache, obj, KFACCurvature, "tensors.safetensors.*checksum")
    V = _rhs(obj)
    assert torch.equal(again.solve(V, 0.2), ref.solve(V, 0.2))


def test_flipped_byte_is_detected(tmp_path):
    obj = make_problem("mlp")
    cache, _, folder = _entry(tmp_path, obj, DenseCurvature)
    path = folder / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    _recompute_with_warning(cache, obj, DenseCurvature, "checksum")


@pytest.mark.parametrize("damage", ["garbage", "empty", "missing", "wrong_key"])
def test_corrupt_manifest_is_detected(tmp_path, damage):
    obj = make_problem("mlp")
    cache, _, folder = _entry(tmp_path, obj, DenseCurvature)
    m = folder / "manifest.json"
    if damage == "garbage":
        m.write_text("{not json")
    elif damage == "empty":
        m.write_text("")
    elif damage == "missing":
        m.unlink()
    else:
        d = json.loads(m.read_text())
        d["key"] = "f" * 64
        m.write_text(json.dumps(d))
    _recompute_with_warning(cache, obj, DenseCurvature, "manifest.json")


def test_manifest_contents(tmp_path):
    obj = make_problem("mlp")
    cache, _, folder = _entry(tmp_path, obj, lambda: LanczosCurvature(m=3))
    m = json.loads((folder / "manifest.json").read_text())
    assert folder.name.startswith("lanczos-") and m["key"].startswith(folder.name.split("-", 1)[1])
    assert m["backend"] == "lanczos" and m["settings"]["m"] == 3
    assert m["library"]["scalable_hbt"] and m["created"]
    assert m["fingerprint"]["extra"] == {"curvature": "hessian", "hvp_mode": "reverse-over-reverse"}
    assert set(m["files"]) == {"tensors.safetensors"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_key_is_the_same_in_another_process(tmp_path):
    """No memory addresses or hash seeds in the key: a fresh interpreter computes the same one."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, torch; sys.path.insert(0, %r)\n"
            "from conftest import brute_force_gradients, brute_force_hessian, make_problem, training_tensors\n"
            "from scalable_hbt.cache import fingerprint\n"
            "from scalable_hbt.curvature import LiSSACurvature\n"
            "print(fingerprint(make_problem('cnn'), LiSSACurvature(deflate=2), {'damping': 0.2}))\n"
            % str(Path(__file__).parent))
    env = {**os.environ, "PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == fingerprint(make_problem("cnn"), LiSSACurvature(deflate=2),
                                                              {"damping": 0.2})


def test_uncacheable_backend_is_just_fitted(tmp_path):
    obj = make_problem("mlp")
    cache = CurvatureCache(tmp_path)
    backend = CGCurvature(preconditioner=lambda R, d: R)
    assert not _fit(obj, backend, cache)[0] and backend.fitted
    assert not list(tmp_path.iterdir())
