"""Package layout: the orchestrator in ``supergen/``, the Triton kernels in the top-level
``triton-kernels/`` folder installed as ``supergen.kernels``, and the C++ sources in ``csrc/``
installed as package data ``supergen._csrc`` so that the CPU extension ``supergen._C`` can be
compiled against the *runtime* torch on first use (see ``supergen/_ext.py`` for why it is not built here)."""

from setuptools import setup

setup(
    packages=["supergen", "supergen.adapters", "supergen.parallel", "supergen.kernels", "supergen._csrc"],
    # The folder's name is not a Python identifier on purpose: a folder named `kernels` at the root is
    # importable as the well-known, unrelated `kernels` package whenever the repository root is on
    # sys.path (`python -m pytest`), and transformers' availability probe then imports it.
    package_dir={"supergen.kernels": "triton-kernels", "supergen._csrc": "csrc"},
    # The trained embedded model (`--model tiny`): a diffusers folder of JSON, text and safetensors files.
    package_data={
        "supergen._csrc": ["*.cpp", "*.h"],
        "supergen": ["models/*/*.json", "models/*/*/*.json", "models/*/*/*.safetensors", "models/*/*/*.txt"],
    },
)
