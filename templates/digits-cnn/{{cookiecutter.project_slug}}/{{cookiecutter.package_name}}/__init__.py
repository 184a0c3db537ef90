"""{{ cookiecutter.project_name }}: a CNN for handwritten digits, trained with and without Gradient Centralization."""

from {{ cookiecutter.package_name }}.data import DigitsDataModule
from {{ cookiecutter.package_name }}.model import DigitsCNN

__all__ = ["DigitsCNN", "DigitsDataModule"]
