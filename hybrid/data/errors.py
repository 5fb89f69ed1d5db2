"""The one error type of the data pipeline."""


class DataError(ValueError):
    """A problem with the recipe's data or tokenizer section or the files it names, as one line
    that starts with the field (``data.source.paths: no files match '...'``)."""
