"""Kept so that Debian's pybuild and older pip can build otad; metadata lives in setup.cfg."""
from setuptools import setup

setup()
