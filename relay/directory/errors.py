"""The directory's one error type (kept apart so that light imports need no pgpy)."""


class DirectoryError(ValueError):
    """Bad input to the directory (a key, an address, a document): the message says what."""
