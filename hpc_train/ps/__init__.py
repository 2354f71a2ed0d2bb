"""Parameter server over MPI one-sided windows: async SGD, SSP, EASGD, staleness-aware learning rates."""

from .store import ParameterStore
from .worker import MODES, ParameterServerOptimizer, staleness_summary

__all__ = ["MODES", "ParameterServerOptimizer", "ParameterStore", "staleness_summary"]
