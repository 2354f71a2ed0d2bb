"""Exceptions shared across layers (the rest live beside the code that raises them)."""


class JobFileError(ValueError):
    """A job file (training TOML or fio INI) that cannot run, naming the file, line or key at fault."""
