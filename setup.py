"""Packaging for scalable_hbt (``pip install -e .[test]``)."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = next(line.split('"')[1] for line in (here / "scalable_hbt" / "__init__.py").read_text().splitlines()
               if line.startswith("__version__"))

setup(
    name="scalable_hbt",
    version=version,
    description="A scalable, matrix-free Hessian engine for influence functions, RelatIF, RUE and "
                "Local-Ensembles extrapolation scores, with an exact dense oracle.",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["scalable_hbt", "scalable_hbt.*"]),
    install_requires=[
        "torch>=2.3",
        "numpy>=1.23",
        "scipy>=1.10",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=7", "scikit-learn>=1.2"],
        "bench": ["pytest-benchmark>=4", "scikit-learn>=1.2", "curvlinops-for-pytorch>=2", "pyhessian>=0.1",
                  "kronfluence>=1.0"],
        "gpu": ["cupy-cuda12x>=13"],
    },
    entry_points={"console_scripts": ["hbt = scalable_hbt.apps.cli:main"]},
)
