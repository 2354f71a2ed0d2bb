"""Training: job files, the Trainer loop, metrics and the timeline."""

from .config import JobFileError, load
from .timeline import Timeline

__all__ = ["JobFileError", "Timeline", "load"]
