"""Batch jobs: ``hbt run JOB.toml`` — a job file, validated, then run chunk by chunk with resume."""

from .runner import prepare_job, read_results, run_job
from .spec import JobError, JobSpec, load_job

__all__ = ["JobSpec", "JobError", "load_job", "prepare_job", "run_job", "read_results"]
