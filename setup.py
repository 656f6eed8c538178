"""Build script. The package is pure Python; the optional compiled extension (csrc/) is added
by the extension work (see README, "Building the extension")."""
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
version = {}
with open(os.path.join(here, "crossvit_kernels", "_version.py")) as f:
    exec(f.read(), version)

setup(
    name="crossvit-kernels",
    version=version["__version__"],
    description="Fused kernels and a timm-exact CrossViT",
    packages=find_packages(include=["crossvit_kernels", "crossvit_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"timm": ["timm>=1.0"]},
)
