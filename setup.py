"""Packages are discovered, not listed, so a new subpackage cannot be left out of a regular install;
io/ and kernels/ are mapped into the package as hpc_train.io and hpc_train.kernels (DESIGN.md: the
tree keeps the design card's top level, the import names stay namespaced). Everything else is in
setup.cfg."""

from setuptools import find_packages, setup

MAPPED = {"hpc_train.io": "io", "hpc_train.kernels": "kernels"}

packages = find_packages(include=["hpc_train", "hpc_train.*"])
for name, folder in MAPPED.items():
    packages += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]

setup(packages=packages, package_dir=MAPPED)
