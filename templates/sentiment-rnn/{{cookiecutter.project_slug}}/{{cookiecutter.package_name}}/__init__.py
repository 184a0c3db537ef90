"""{{ cookiecutter.project_name }}: movie-review sentiment with a recurrent network, trained with Gradient Centralization."""

from .data import SentimentDataModule
from .model import SentimentRNN

__all__ = ["SentimentDataModule", "SentimentRNN"]
