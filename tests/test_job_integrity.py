"""Batch jobs never mix stale or damaged results, and every bad input is caught before work starts.

End to end through ``run_job`` and the ``hbt run`` command: a folder's numbers belong to the
inputs named in its job, all of them, or the tool says otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scalable_hbt.apps.cli import main
from scalable_hbt.apps.jobs import JobError, load_job, read_results, run_job
from jobs_fixture import write_job, write_problem

TESTS = Path(__file__).parent
ROOT = TESTS.parent
QUIET = dict(echo=lambda *_: None, progress=False)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    write_problem(tmp_path)
    return tmp_path


def _run(folder: Path, **kw):
    return run_job(load_job(write_job(folder, **kw)), **QUIET)


# ------------------------------------------------------------------ changed inputs are named, never mixed
@pytest.mark.parametrize("change, named", [
    ("weights", "the model's parameters"),
    ("train", "the training data"),
    ("test", "the test data"),
    ("code", "the model's code"),
])
def test_a_changed_input_is_refused_naming_it(folder, change, named):
    _run(folder, methods='["influence", "lees"]')
    if change == "weights":
        state = torch.load(folder / "weights.pt")
        state["0.weight"][0, 0] += 1e-3
        torch.save(state, folder / "weights.pt")
    elif change == "train":
        with np.load(folder / "train.npz") as d:
            X, y = d["X"].copy(), d["y"]
        X[5, 1] += 1e-6
        np.savez(folder / "train.npz", X=X, y=y)
    elif change == "test":
        test = torch.load(folder / "test.pt")
        test["X"][0, 0] += 1e-6
        torch.save(test, folder / "test.pt")
    else:  # the factory's module: the same class and weights, another function called by its forward
        source = ("import torch\nfrom torch import nn\n\ndef act(x):\n    return torch.{}(x)\n\n"
                  "class Net(nn.Module):\n    def __init__(self, width=5):\n        super().__init__()\n"
                  "        self.a, self.b = nn.Linear(4, width), nn.Linear(width, 3)\n\n"
                  "    def forward(self, x):\n        return self.b(act(self.a(x)))\n\n"
                  "def make_net(width=5):\n    return Net(width)\n")
        (folder / "local_model.py").write_text(source.format("tanh"))
        state = torch.load(folder / "weights.pt")
        torch.save({"a.weight": state["0.weight"], "a.bias": state["0.bias"], "b.weight": state["2.weight"],
                    "b.bias": state["2.bias"]}, folder / "net.pt")
        job = write_job(folder, methods='["influence", "lees"]')
        job.write_text(job.read_text().replace("jobs_fixture:make_mlp", "local_model:make_net")
                       .replace('"weights.pt"', '"net.pt"'))
        run_job(load_job(job), overwrite=True, **QUIET)
        (folder / "local_model.py").write_text(source.format("sigmoid"))
        sys.modules.pop("local_model", None)
        with pytest.raises(JobError, match=f"{named}.*--overwrite"):
            run_job(load_job(job), **QUIET)
        return
    with pytest.raises(JobError, match=f"holds results of a different job: .*{named}.*--overwrite"):
        _run(folder, methods='["influence", "lees"]')
    summary = run_job(load_job(write_job(folder, methods='["influence", "lees"]')), overwrite=True, **QUIET)
    assert summary["chunks_skipped"] == 0 and summary["chunks_computed"] == 10


# ------------------------------------------------------------------ damaged chunks
def test_damaged_chunks_are_recomputed_with_a_warning_and_missing_ones_refused(folder):
    _run(folder, methods='["influence", "rue"]')
    out = folder / "out"
    reference = read_results(out, "influence")
    (out / "influence" / "chunk-000001.npy").write_bytes(b"garbage")              # not an array at all
    data = (out / "influence" / "chunk-000002.npy").read_bytes()
    (out / "influence" / "chunk-000002.npy").write_bytes(data[: len(data) // 2])  # truncated
    altered = np.load(out / "rue" / "chunk-000003.npy")
    np.save(out / "rue" / "chunk-000003.npy", altered + 1.0)                      # a valid array, wrong numbers
    with pytest.raises(JobError, match=r"influence results .* test points 5–14 of 24 are missing or invalid"):
        read_results(out, "influence")
    rows, index = read_results(out, "influence", allow_partial=True)
    assert rows.shape == (14, 60) and index.tolist() == list(range(5)) + list(range(15, 24))
    with pytest.warns(RuntimeWarning, match="does not match its recorded checksum"):
        summary = _run(folder, methods='["influence", "rue"]')
    assert summary["chunks_computed"] == 3
    np.testing.assert_array_equal(read_results(out, "influence"), reference)
    (out / "rue" / "chunk-000004.npy").unlink()
    with pytest.raises(JobError, match=r"test points 20–23 of 24"):
        read_results(out, "rue")


def test_debris_of_a_killed_writer_is_removed(folder):
    _run(folder, methods='["lees"]')
    out = folder / "out"
    orphan = out / "cache" / f".dense-0123.tmp-{2**22 + 17}-abcdef12"   # a pid that is not running
    orphan.mkdir(parents=True)
    (orphan / "tensors.safetensors").write_bytes(b"half")
    stray = out / "lees" / f".chunk-000001.npy.tmp-{2**22 + 17}-abcdef12"
    stray.write_bytes(b"half")
    _run(folder, methods='["lees"]')
    assert not orphan.exists() and not stray.exists()


def test_relatif_normalizer_is_computed_once_per_job(folder, monkeypatch):
    import scalable_hbt.toolbox as toolbox

    calls = []
    original = toolbox.inverse_gradient_norms
    monkeypatch.setattr(toolbox, "inverse_gradient_norms", lambda *a, **k: calls.append(1) or original(*a, **k))
    summary = _run(folder, methods='["relatif"]')
    assert summary["chunks_computed"] == 5 and len(calls) == 1


# ------------------------------------------------------------------ one job per folder at a time
def _cli(job: Path, *extra: str, pythonpath: bool = True) -> subprocess.Popen:
    paths = [str(TESTS), str(ROOT)] if pythonpath else [str(ROOT)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "scalable_hbt.apps.cli", "run", str(job), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_run_on_the_same_folder_refuses_naming_the_first(folder):
    job = write_job(folder, chunk=1, methods='["rue"]', bootstrap=300)
    first = _cli(job)
    deadline = time.time() + 120
    while not (folder / "out" / "job.json").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = _cli(job)
    _, err = second.communicate(timeout=120)
    still_running = first.poll() is None
    first.wait(timeout=600)
    assert still_running, "the first run finished before the second started: make it slower"
    assert second.returncode == 2 and f"in use by another `hbt run` (pid {first.pid})" in err
    assert "Traceback" not in err
    waited = _cli(job, "--wait")
    assert waited.wait(timeout=600) == 0


# ------------------------------------------------------------------ --dry-run catches what would fail later
@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("n_bootstrap = 4", "n_bootstrap = 1"), r"\[methods.rue\] n_bootstrap = 1: expected an integer ≥ 2"),
    (lambda t: t.replace("n_bootstrap = 4", 'n_bootstrap = "4"'), r"\[methods.rue\] n_bootstrap = '4'"),
    (lambda t: t.replace("seed = 3 }", 'seed = 3, method = "magic" }'), r"\[methods.rue\] method = 'magic'"),
    (lambda t: t.replace("lees = { m = 4 }", 'lees = { m = "four" }'), r"\[methods.lees\] m = 'four'"),
    (lambda t: t.replace("lees = { m = 4 }", "lees = { m = 44 }"), r"\[methods.lees\] m = 44: expected at most M = 43"),
    (lambda t: t.replace("[methods]", '[methods]\nrelatif_normalizer = "magic"'), r"\[methods.relatif\] normalizer = 'magic'"),
    (lambda t: t.replace("rtol = 1e-12", 'rtol = "tight"'), r"\[curvature\] cg: rtol = 'tight'"),
    (lambda t: t.replace("rtol = 1e-12", "rtl = 1e-12"), r"\[curvature\] inverse_options: the 'cg' backend takes no option\(s\) \['rtl'\]"),
    (lambda t: t.replace("m = 8 }", "mm = 8 }"), r"\[curvature\] eigen_options: the 'lanczos' backend takes no option\(s\) \['mm'\]"),
    (lambda t: t.replace('dir = "out"', 'dir = "weights.pt"'), r"\[output\] dir = 'weights.pt': .* exists and is not a folder"),
    (lambda t: t.replace('state_dict = "weights.pt"', 'state_dict = "missing.pt"'), r"\[model\] state_dict = 'missing.pt': file .* does not exist"),
    (lambda t: t.replace('dtype = "float64"', 'dtype = "float64"\ndevice = "cuda"'), r"\[objective\] device = 'cuda': expected a device that exists"),
    (lambda t: t.replace("weight_decay = 0.01", "weight_decay = inf"), r"\[objective\] weight_decay = inf: expected a number"),
    (lambda t: t.replace('run = ["influence", "relatif", "rue", "lees"]', 'run = ["influence", "influence"]'),
     r"\[methods\] run = .*\['influence'\] listed more than once"),
    (lambda t: t.replace('train = "train.npz"', 'train = "nowhere.npz"'), r"\[data\] train = 'nowhere.npz': file .* does not exist"),
    (lambda t: t.replace('factory = "jobs_fixture:make_mlp"', 'factory = "jobs_fixture:make_nothing"'),
     r"\[model\] factory = 'jobs_fixture:make_nothing' cannot be imported"),
])
def test_dry_run_rejects_each_malformed_value_naming_the_key(folder, edit, message):
    if "cuda" in message and torch.cuda.is_available():
        pytest.skip("CUDA exists here")
    job = write_job(folder)
    job.write_text(edit(job.read_text()))
    with pytest.raises(JobError, match=message):
        run_job(load_job(job), dry_run=True, **QUIET)
    assert not (folder / "out" / "job.json").exists()


def test_a_failed_start_leaves_no_job_record(folder):
    """A job that fails while loading writes nothing that would refuse the corrected job."""
    job = write_job(folder)
    job.write_text(job.read_text().replace('state_dict = "weights.pt"', 'state_dict = "missing.pt"'))
    with pytest.raises(JobError):
        run_job(load_job(job), **QUIET)
    summary = _run(folder)
    assert summary["chunks_computed"] == 20


def test_errors_are_one_line_on_stderr_with_exit_status_2(folder, capsys):
    job = write_job(folder)
    job.write_text(job.read_text().replace("n_bootstrap = 4", "n_bootstrap = 1"))
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hbt run: [methods.rue] n_bootstrap = 1") and "Traceback" not in err
    assert main(["run", str(job), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


# ------------------------------------------------------------------ factories as a user writes them
def test_a_dotted_factory_module_beside_the_job_file_is_importable(folder):
    package = folder / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text((TESTS / "jobs_fixture.py").read_text())
    job = write_job(folder, methods='["lees"]')
    job.write_text(job.read_text().replace("jobs_fixture:make_mlp", "mypkg.models:make_mlp"))
    proc = _cli(job, pythonpath=False)  # the tests folder is not on the path: only the job's folder is
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads((folder / "out" / "job.json").read_text())["n_test"] == 24
