"""The job file: a TOML document validated into a :class:`JobSpec` of typed settings.

Example (every key shown; the ``[model]``, ``[data]`` and ``[output]`` tables are required)::

    [model]
    factory = "mypkg.models:make_model"   # importable callable returning an nn.Module
    kwargs = { width = 64 }               # passed to the factory
    state_dict = "weights.pt"             # optional, loaded with torch.load(weights_only=True)
    # torchscript = "model.ts"            # instead of factory: a TorchScript file

    [data]
    train = "train.npz"                   # .npz with arrays X and y, a .pt file holding (X, y) or
    test = "test.npz"                     # {"X":…, "y":…}, or "module:function" returning (X, y) or a Dataset

    [objective]
    loss = "cross_entropy"                # or "mse"
    weight_decay = 5e-5
    batch_size = 256
    dtype = "float32"                     # or "float64"
    device = "cpu"                        # or "cuda", "cuda:1"

    [curvature]
    damping = "auto"                      # or a number
    inverse = "cg"                        # dense | cg | lissa | kfac | ekfac | lowrank
    eigen = "lanczos"                     # dense | lanczos | lowrank
    inverse_options = { rtol = 1e-8 }
    eigen_options = { m = 20 }
    rue_damping = 1.2                     # optional; default damping + 1
    max_vectors = 32                      # HVPs batched together; cg/lissa solve this many columns at a time
    cache_graphs = false                  # keep the training chunks' gradient graphs between HVPs (small networks)

    [methods]
    run = ["influence", "relatif", "rue", "lees"]
    labels = "true"                       # "true" or "predicted" (LEES has its own default, "predicted")
    test_loss = "objective"
    relatif_normalizer = "ekfac"          # optional
    rue = { n_bootstrap = 50, seed = 0, method = "bootstrap" }
    lees = { threshold = 0.1 }            # or { m = 10 } or { m = "auto" }

    [output]
    dir = "results"
    chunk_size = 64                       # test points per chunk (one file per method and chunk)

Relative paths are taken relative to the job file's folder. Defaults are those of
:class:`~scalable_hbt.config.ObjectiveSettings`, :class:`~scalable_hbt.config.CurvatureConfig`
and each method's settings; the job file adds nothing of its own but the file layout.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ...config import CurvatureConfig, ObjectiveSettings
from ...errors import InputError
from ...methods import METHODS

COMMON_METHOD_KEYS = ("labels", "test_loss")
"""``[methods]`` keys that apply to every method with such a field (LEES keeps its own labels)."""


class JobError(ValueError):
    """A malformed or unrunnable job; the message names the key and what is expected."""


@dataclass(frozen=True)
class ModelSpec:
    """``[model]``: a factory ("module:function", with ``kwargs``, optional ``state_dict``) or a
    TorchScript file."""

    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    state_dict: str | None = None
    torchscript: str | None = None


@dataclass(frozen=True)
class JobSpec:
    """A validated job: where it came from and every setting, typed."""

    path: Path
    text: bytes
    model: ModelSpec
    train: str
    test: str
    objective: ObjectiveSettings
    curvature: CurvatureConfig
    methods: dict[str, Any]              # method name → its settings dataclass, in run order
    output_dir: Path
    chunk_size: int = 64

    @property
    def folder(self) -> Path:
        """The job file's folder: relative paths and importable modules are looked up there."""
        return self.path.parent

    def resolve(self, value: str) -> Path:
        """A path relative to the job file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.folder / p


def is_import_spec(value: str) -> bool:
    """Whether ``value`` names a Python object, "package.module:function" (not a file path)."""
    module, sep, attr = value.partition(":")
    return bool(sep) and bool(attr) and attr.isidentifier() and all(
        part.isidentifier() for part in module.split("."))


def _table(doc: dict, key: str, required: bool) -> dict:
    if key not in doc:
        if required:
            raise JobError(f"missing table [{key}]; see `scalable_hbt.apps.jobs.spec` for an example job file.")
        return {}
    if not isinstance(doc[key], dict):
        raise JobError(f"[{key}] must be a table, got {type(doc[key]).__name__}.")
    return doc[key]


def _unknown(table: dict, name: str, known: list[str] | tuple[str, ...]) -> None:
    extra = sorted(set(table) - set(known))
    if extra:
        raise JobError(f"[{name}] has unknown key(s) {extra}; known keys: {sorted(known)}.")


def _settings(cls: type, table: dict, name: str) -> Any:
    """``cls(**table)``, with an unknown key or a bad value reported as a JobError naming ``[name]``."""
    _unknown(table, name, [f.name for f in fields(cls)])
    try:
        return cls(**table)
    except InputError as err:
        raise JobError(f"[{name}] {err}") from None


def _string(table: dict, name: str, key: str, what: str, required: bool = False) -> str | None:
    if key not in table:
        if required:
            raise JobError(f"[{name}] needs the key '{key}' ({what}).")
        return None
    if not isinstance(table[key], str):
        raise JobError(f"[{name}] {key} = {table[key]!r}: expected {what}.")
    return table[key]


def _model(doc: dict) -> ModelSpec:
    model = _table(doc, "model", True)
    _unknown(model, "model", ("factory", "kwargs", "state_dict", "torchscript"))
    if ("factory" in model) == ("torchscript" in model):
        raise JobError("[model] needs exactly one of 'factory' (\"module:function\") or 'torchscript' (a file).")
    factory = _string(model, "model", "factory", 'a "module:function" string')
    if factory is not None and not is_import_spec(factory):
        raise JobError(f"[model] factory = {factory!r}: expected \"module:function\" (e.g. \"mypkg.models:make_model\").")
    kwargs = model.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise JobError(f"[model] kwargs = {kwargs!r}: expected a table of keyword arguments.")
    return ModelSpec(factory=factory, kwargs=kwargs,
                     state_dict=_string(model, "model", "state_dict", "a path to a state-dict file"),
                     torchscript=_string(model, "model", "torchscript", "a path to a TorchScript file"))


def _data(doc: dict) -> tuple[str, str]:
    data = _table(doc, "data", True)
    _unknown(data, "data", ("train", "test"))
    out = []
    for key in ("train", "test"):
        spec = _string(data, "data", key, 'a .npz or .pt file, or "module:function"', required=True)
        if not (is_import_spec(spec) or Path(spec).suffix in (".npz", ".pt", ".pth")):  # type: ignore[arg-type]
            raise JobError(f"[data] {key} = {spec!r}: expected a .npz or .pt file, or \"module:function\".")
        out.append(spec)
    return out[0], out[1]


def _methods(doc: dict) -> dict[str, Any]:
    table = _table(doc, "methods", False)
    _unknown(table, "methods", ("run", "relatif_normalizer", *COMMON_METHOD_KEYS, *METHODS))
    run = table.get("run", ["influence"])
    if not isinstance(run, list) or not run or any(m not in METHODS for m in run):
        raise JobError(f"[methods] run = {run!r}: expected a non-empty list drawn from {list(METHODS)}.")
    repeated = sorted({m for m in run if run.count(m) > 1})
    if repeated:
        raise JobError(f"[methods] run = {run!r}: {repeated} listed more than once; list each method once.")
    common = {k: table[k] for k in COMMON_METHOD_KEYS if k in table}
    settings = {}
    for name in run:
        own = table.get(name, {})
        if not isinstance(own, dict):
            raise JobError(f"[methods] {name} = {own!r}: expected a table of {name} options.")
        if name == "relatif" and "relatif_normalizer" in table:
            own = {"normalizer": table["relatif_normalizer"], **own}
        accepted = {f.name for f in fields(METHODS[name].settings)}
        inherited = {k: v for k, v in common.items() if k in accepted and not (name == "lees" and k == "labels")}
        settings[name] = _settings(METHODS[name].settings, {**inherited, **own}, f"methods.{name}")
    return settings


def load_job(path: str | Path) -> JobSpec:
    """Parse and validate a job file; raise :class:`JobError` naming the offending key.

    Everything that can be checked without the model and data is checked here; the model,
    data and files named by the job are checked by :func:`scalable_hbt.apps.jobs.runner.prepare_job`
    before any computation."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"job file {str(path)!r} does not exist.")
    text = path.read_bytes()
    try:
        doc = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise JobError(f"{path} is not valid TOML: {err}") from err
    _unknown(doc, "job file", ("model", "data", "objective", "curvature", "methods", "output"))
    model = _model(doc)
    train, test = _data(doc)
    objective = _settings(ObjectiveSettings, _table(doc, "objective", False), "objective")
    curvature = _settings(CurvatureConfig, _table(doc, "curvature", False), "curvature")
    methods = _methods(doc)
    output = _table(doc, "output", True)
    _unknown(output, "output", ("dir", "chunk_size"))
    out_dir = _string(output, "output", "dir", "a folder path", required=True)
    chunk = output.get("chunk_size", 64)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise JobError(f"[output] chunk_size = {chunk!r}: expected an integer ≥ 1.")
    path = path.resolve()
    output_dir = Path(out_dir).expanduser()  # type: ignore[arg-type]
    output_dir = output_dir if output_dir.is_absolute() else path.parent / output_dir
    if output_dir.exists() and not output_dir.is_dir():
        raise JobError(f"[output] dir = {out_dir!r}: {str(output_dir)!r} exists and is not a folder.")
    return JobSpec(path=path, text=text, model=model, train=train, test=test, objective=objective,
                   curvature=curvature, methods=methods, output_dir=output_dir, chunk_size=chunk)
