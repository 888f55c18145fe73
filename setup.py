"""Package layout: the orchestrator in ``supergen/``, the Triton kernels in the top-level ``kernels/``
folder installed as ``supergen.kernels`` (never as a top-level ``kernels`` module: a different,
well-known package of that name exists), and the C++ sources in ``csrc/`` installed as package data
``supergen/_csrc`` so that the CPU extension ``supergen._C`` can be compiled against the *runtime*
torch on first use (see ``supergen/_ext.py`` for why it is not built here)."""

from setuptools import setup

setup(
    packages=["supergen", "supergen.adapters", "supergen.kernels", "supergen._csrc"],
    package_dir={"supergen.kernels": "kernels", "supergen._csrc": "csrc"},
    package_data={"supergen._csrc": ["*.cpp", "*.h"]},
)
