"""Run a validated job: load, fit once, then every method chunk by chunk with resume.

Layout of the output folder::

    job.json                 which job (file digest), sizes and chunking; a different job is refused
    cache/                   the fitted curvature (safetensors), so a restarted job does not refit
    influence/chunk-000003.npy   rows of test points [3·c, 4·c) (one file per method and chunk)
    rue/chunk-000003.npy
    summary.json             time per phase, HVPs, solver diagnostics (rewritten at the end)

Each chunk file is written to a temporary name and renamed (atomic on POSIX), so a job
killed at any moment leaves only whole files; started again with the same command it
skips every finished chunk and loses nothing. Under ``torch.distributed`` (``torchrun ... -m
scalable_hbt.cli run JOB.toml``) rank 0 decides which chunks are pending; chunks of methods
that need only the test points once fitted (LEES, bootstrap RUE) are dealt out to the ranks,
each writing its own; influence, similarity and RelatIF chunks run on all ranks together
(their solves and training-data passes are collectives over the sharded training set) and
rank 0 writes them.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..curvature.lanczos import basis_size_for
from ..memory import format_bytes
from ..objective import Objective
from ..progress import progress_bar
from ..toolbox import Toolbox
from .spec import JobError, JobSpec

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _import(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise JobError(f"cannot import {spec!r}: {err}. Is the module on PYTHONPATH?") from err


def load_model(spec: JobSpec) -> nn.Module:
    """The model named by ``[model]``: a factory (plus optional state dict) or a TorchScript file."""
    m = spec.model
    if "torchscript" in m:
        return torch.jit.load(spec.resolve(m["torchscript"]), map_location="cpu")
    model = _import(m["factory"])(**m.get("kwargs", {}))
    if not isinstance(model, nn.Module):
        raise JobError(f"[model] factory {m['factory']!r} returned {type(model).__name__}, not an nn.Module.")
    if "state_dict" in m:
        state = torch.load(spec.resolve(m["state_dict"]), map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise JobError(f"[model] state_dict {m['state_dict']!r} does not fit the model: {err}") from err
    return model.eval()


def load_data(spec: JobSpec, key: str) -> Any:
    """``[data] train|test``: (X, y) tensors from .npz/.pt, or what a factory returns."""
    source = spec.data[key]
    if ":" in source and not Path(source).suffix:
        return _import(source)()
    path = Path(spec.resolve(source))
    if not path.is_file():
        raise JobError(f"[data] {key} = {source!r}: file {str(path)!r} does not exist.")
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            if "X" not in arrays:
                raise JobError(f"[data] {key}: {path.name} must contain an array named 'X' (and 'y').")
            X = torch.from_numpy(arrays["X"])
            y = torch.from_numpy(arrays["y"]) if "y" in arrays else None
        return (X, y) if y is not None else X
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        return (obj["X"], obj["y"]) if "y" in obj else obj["X"]
    return obj


def build_toolbox(spec: JobSpec, model: nn.Module, train: Any) -> Toolbox:
    o, c = spec.objective, spec.curvature
    obj = Objective(model, o.get("loss", "cross_entropy"), train, weight_decay=float(o.get("weight_decay", 0.0)),
                    batch_size=int(o.get("batch_size", 256)),
                    dtype=_DTYPES[o.get("dtype", "float32")], progress=distributed.is_writer(),
                    device=distributed.local_device(o.get("device", "cpu")))
    return Toolbox(obj, damping=c.get("damping", "auto"), inverse=c.get("inverse", "cg"),
                   eigen=c.get("eigen", "lanczos"), rue_damping=c.get("rue_damping"),
                   max_vectors=c.get("max_vectors", 32), cache_graphs=c.get("cache_graphs", False),
                   inverse_options=c.get("inverse_options") or None, eigen_options=c.get("eigen_options") or None,
                   cache_dir=spec.output_dir / "cache")


def plan(spec: JobSpec, tb: Toolbox, n_test: int) -> dict[str, Any]:
    """Sizes, chunks and memory estimates (bytes) of the work a job will do."""
    obj = tb.objective
    item = torch.finfo(obj.dtype).bits // 8
    M, n, chunk = obj.num_params, obj.n, spec.chunk_size
    methods = spec.methods.get("run", ["influence"])
    memory = {
        "parameters": M * item,
        "per_sample_gradient_chunk": obj.per_sample_grad_chunk() * M * item,
        "test_gradients_per_chunk": chunk * M * item,
    }
    if {"influence", "similarity", "relatif"} & set(methods):
        memory["influence_rows_per_chunk"] = chunk * n * item
    if tb.inverse.name in ("cg", "lissa"):  # about seven (M, columns) work arrays per block of columns
        memory["iterative_solver_work"] = 7 * min(chunk, tb.hessian.max_vectors) * M * item
    if tb.inverse.name == "dense" or tb.eigen.name == "dense":
        memory["dense_hessian"] = int(3.5 * 8 * M * M)
    if tb.eigen.name in ("lanczos", "lowrank"):  # thick-restart basis: the peak of the fit; m vectors stay
        memory["lanczos_basis"] = basis_size_for(tb.eigen.m, tb.eigen.basis_size) * M * item
    return {"num_params": M, "n_train": n, "n_test": n_test, "chunk_size": chunk,
            "chunks": -(-n_test // chunk), "methods": methods, "inverse": tb.inverse.name, "eigen": tb.eigen.name,
            "memory_bytes": memory}


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _check_output(spec: JobSpec, info: dict) -> None:
    """Refuse an output folder that holds another job's results; claim a new one (rank 0
    decides and writes, every rank learns the verdict)."""
    problem = None
    if distributed.is_writer():
        out = spec.output_dir
        manifest = out / "job.json"
        if manifest.exists():
            previous = json.loads(manifest.read_text())
            if previous.get("job_digest") != spec.digest or previous.get("n_test") != info["n_test"]:
                problem = (
                    f"the output folder {str(out)!r} holds results of a different job (its job.json was written for "
                    f"{previous.get('job_file')!r} with another content); choose a new [output] dir or delete it.")
        else:
            out.mkdir(parents=True, exist_ok=True)
            _write_json(manifest, {"job_file": str(spec.path), "job_digest": spec.digest, **info})
    problem = distributed.broadcast_object(problem)
    if problem:
        raise JobError(problem)


def _pending(spec: JobSpec, methods: list[str], chunks: int) -> list[tuple[int, str]]:
    """The (chunk, method) pairs whose file is not written yet, as rank 0 sees them (every rank
    must run the same collective solves, so none decides from its own view of the folder)."""
    todo = None
    if distributed.is_writer():
        todo = [(c, method) for c in range(chunks) for method in methods
                if not (spec.output_dir / method / f"chunk-{c:06d}.npy").exists()]
    return distributed.broadcast_object(todo)


def _test_local_methods(spec: JobSpec) -> set[str]:
    """Methods whose per-chunk work, once fitted, touches only the test points (no pass over
    the training data, no solve): LEES, and RUE by bootstrap (its shifts are solved once).
    Under torch.distributed their chunks are dealt out to the ranks (chunk c to rank c mod W);
    the other methods run every chunk on all ranks with the training data sharded."""
    local = {"lees"}
    if spec.methods.get("rue", {}).get("method", "bootstrap") == "bootstrap":
        local.add("rue")
    return local


def _compute(tb: Toolbox, method: str, X: torch.Tensor, y: torch.Tensor | None, spec: JobSpec) -> np.ndarray:
    m = spec.methods
    labels, test_loss = m.get("labels", "true"), m.get("test_loss", "objective")
    if method == "influence":
        result = tb.influence(X, y, labels=labels, test_loss=test_loss)
    elif method == "similarity":
        result = tb.similarity(X, y, labels=labels, test_loss=test_loss)
    elif method == "relatif":
        result = tb.relatif(X, y, labels=labels, test_loss=test_loss, normalizer=m.get("relatif_normalizer"))
    elif method == "rue":
        r = m.get("rue", {})
        result = tb.rue(X, y, labels=labels, test_loss=test_loss, n_bootstrap=r.get("n_bootstrap", 50),
                        seed=r.get("seed", 0), method=r.get("method", "bootstrap"))
    else:
        lees = m.get("lees", {})
        result = tb.extrapolation_score(X, y, labels=lees.get("labels", "predicted"), m=lees.get("m"),
                                        threshold=lees.get("threshold", 0.1), test_loss=test_loss)
    return result.detach().cpu().numpy()


def run_job(spec: JobSpec, *, dry_run: bool = False, echo=print) -> dict[str, Any]:
    """Run (or, with ``dry_run``, only plan) a job; returns the summary (or the plan)."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    model = load_model(spec)
    train = load_data(spec, "train")
    test = load_data(spec, "test")
    tb = build_toolbox(spec, model, train)
    X_test, y_test = (test if isinstance(test, tuple) else (test, None))
    if not isinstance(X_test, torch.Tensor):
        raise JobError("[data] test must give tensors (X, y) or X; Datasets are supported for train only.")
    times["load"] = time.perf_counter() - t0
    info = plan(spec, tb, len(X_test))
    if dry_run:
        echo(f"job {spec.path.name}: M = {info['num_params']:,} parameters, n = {info['n_train']:,} training and "
             f"{info['n_test']:,} test points in {info['chunks']} chunks of {info['chunk_size']}")
        echo(f"  methods {info['methods']} with inverse={info['inverse']}, eigen={info['eigen']}; output {spec.output_dir}")
        for name, size in info["memory_bytes"].items():
            echo(f"  memory {name:<28} {format_bytes(size)}")
        return info
    _check_output(spec, info)

    t0 = time.perf_counter()
    tb.fit()
    times["fit"] = time.perf_counter() - t0
    methods = info["methods"]
    for method in methods:
        times[method] = 0.0
        if distributed.is_writer():
            folder = spec.output_dir / method
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(".chunk-*.tmp"):  # left by a run killed mid-write
                stale.unlink()
    todo = _pending(spec, methods, info["chunks"])
    skipped = info["chunks"] * len(methods) - len(todo)
    local = _test_local_methods(spec) & {method for _, method in todo}
    if distributed.active() and local:  # one collective call fits what they need (eigenpairs, RUE shifts)
        for method in sorted(local):
            _compute(tb, method, X_test[:1], y_test[:1] if y_test is not None else None, spec)
    rank, world = distributed.rank(), distributed.world_size()
    for c, method in progress_bar(todo, total=len(todo), desc="test chunks", enabled=distributed.is_writer()):
        if method in local and c % world != rank:
            continue  # another rank's chunk
        lo, hi = c * spec.chunk_size, min((c + 1) * spec.chunk_size, len(X_test))
        t1 = time.perf_counter()
        array = _compute(tb, method, X_test[lo:hi], y_test[lo:hi] if y_test is not None else None, spec)
        if method in local or distributed.is_writer():
            _save_atomic(spec.output_dir / method / f"chunk-{c:06d}.npy", array)
        times[method] += time.perf_counter() - t1
    distributed.barrier()
    computed = len(todo)
    summary = {"job_file": str(spec.path), "plan": info, "seconds": times, "chunks_computed": computed,
               "chunks_skipped": skipped, "toolbox": tb.diagnostics}
    if distributed.is_writer():
        _write_json(spec.output_dir / "summary.json", summary)
    echo(f"done: {computed} chunk files computed, {skipped} already there; seconds "
         + ", ".join(f"{k} {v:.1f}" for k, v in times.items()) + f"; HVPs {tb.hessian.num_hvps:.0f}")
    return summary


def read_results(output_dir: str | Path, method: str) -> np.ndarray:
    """Concatenate a method's chunk files in order (rows = test points)."""
    files = sorted(Path(output_dir, method).glob("chunk-*.npy"))
    if not files:
        raise JobError(f"no results for {method!r} in {str(output_dir)!r}.")
    return np.concatenate([np.load(f) for f in files])
