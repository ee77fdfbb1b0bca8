"""The indexer's exception types; every message says what is wrong and with which file."""


class BundleError(Exception):
    """A model bundle cannot be used: missing files, wrong hash, unknown format version, ..."""


class InputError(ValueError):
    """One input (an image, a video, a text) cannot be encoded: corrupt, truncated, too large."""


class CollectionError(Exception):
    """A collection or index bundle cannot be used: missing, built by another model, damaged."""
