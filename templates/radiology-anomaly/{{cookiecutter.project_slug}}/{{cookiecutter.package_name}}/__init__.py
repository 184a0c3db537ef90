"""{{ cookiecutter.project_name }}: anomaly detection in radiology images, trained with and without Gradient Centralization."""

from {{ cookiecutter.package_name }}.data import RadiologyDataModule
from {{ cookiecutter.package_name }}.model import AnomalyDetector

__all__ = ["AnomalyDetector", "RadiologyDataModule"]
