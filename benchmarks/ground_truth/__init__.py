"""Ground-truth benchmark: every backend and peer scored against retraining.

Modules: ``workload`` (the contracts), ``training`` (the seeded trainer), ``workloads`` (the
problems and their registry), ``retrain_cache`` (resumable on-disk retrains), ``truths`` (LDS
subsets, bootstrap ensembles, leave-one-out), ``scores`` (LDS, RUE and LEES scores),
``ours`` (this project's backends as attributions), ``measure`` (time, gradients, memory),
``report`` (GROUND_TRUTH.md and plots) and ``run`` (the command). Run it with
``python -m benchmarks.ground_truth.run --quick`` from the repository root (``hbt bench
--ground-truth`` does).
"""
