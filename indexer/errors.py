"""The indexer's exception types; every message says what is wrong and with which file."""


class CollectionError(Exception):
    """A collection or index bundle cannot be used: missing, built by another model, damaged."""
