"""One error tree for everything a user can get wrong.

Every message is one line that names the input, what was wrong and, where it helps, what to do. The CLI
prints ``str(error)`` and exits with status 2; it never shows a traceback for a ``ButterError``.
"""

from __future__ import annotations


class ButterError(Exception):
    """Base class of the errors butter raises for bad input or an unusable environment."""


class SpecError(ButterError):
    """Raised when a sweep spec (TOML file or preset) is malformed or names values that are not allowed."""


class DatasetError(ButterError):
    """Raised when a task's data file cannot be found, read or downloaded."""


class DatasetChecksumError(DatasetError):
    """Raised when a task file's sha256 differs from the one in the package manifest."""


class StoreError(ButterError):
    """Raised when a store URI is malformed or the store cannot be reached with the given credentials."""


class ClusterError(ButterError):
    """Raised when the Dask scheduler named by an address cannot be reached."""


class PublishConflict(ButterError):
    """Raised when the published tables are in a state the publisher cannot safely extend."""


class ReleaseError(ButterError):
    """Raised when a release name is malformed, already taken, or not found in the store."""


class ReadError(ButterError):
    """Raised when a read names a table, column or version the dataset does not have."""


class ExportError(ButterError):
    """Raised when an export target cannot be used."""


class StagingError(ButterError):
    """A staged file that cannot be published as it is."""


class FigureError(ButterError):
    """Raised when a figure or report names a dataset, shape or depth the store has no summaries for."""
