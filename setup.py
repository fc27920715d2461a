"""Packaging lives in pyproject.toml; this file lets older tools run ``pip install -e .``."""

from setuptools import setup

setup()
