"""The model package's one exception type."""


class ModelError(Exception):
    """A model, checkpoint or training configuration cannot be used; the message says why."""
