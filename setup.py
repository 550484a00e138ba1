"""Build entry point. Metadata lives in pyproject.toml; this file exists for the C++/CUDA
extension (csrc/), which later issues add behind environment flags read in one place."""

from setuptools import setup

setup()
