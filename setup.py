"""Package discovery: every package under dfgen/ (found, never listed by hand), plus the
kernel templates and the shipped tuned files, which live at the top of the checkout
(templates/, tuned/) and install inside the package as dfgen._templates and dfgen._tuned.
Everything else about the build is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["dfgen", "dfgen.*"]) + ["dfgen._templates", "dfgen._tuned"],
    package_dir={"dfgen._templates": "templates", "dfgen._tuned": "tuned"},
)
