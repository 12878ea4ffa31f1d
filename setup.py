"""A shim for tools that still call setup.py: everything is read from pyproject.toml."""

from setuptools import setup

setup()
