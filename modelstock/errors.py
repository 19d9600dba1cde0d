"""The error hierarchy: every bad input maps to one of these, caught once at the CLI.

Messages are single lines that name the file (URL) and the tensor. Every class takes a single
message argument so instances pickle cleanly across Ray process boundaries.
"""

from __future__ import annotations


class ModelStockError(Exception):
    """Base class for every error this project raises on purpose."""


class InputError(ModelStockError):
    """Bad input or configuration: the CLI prints one line and exits with code 2."""


class InvalidCheckpoint(InputError):
    """A checkpoint file or folder is malformed (header, offsets, dtype, values, layout)."""


class IncompatibleModels(InputError):
    """The models cannot be merged together (tensor sets, shapes or dtypes differ)."""


class InvalidRecipe(InputError):
    """The merge recipe (YAML) or a command-line option is invalid."""


class OutputConflict(InputError):
    """The output location holds something this merge must not overwrite or mix with."""


class StorageError(ModelStockError):
    """Object storage failed (network, server, write); possibly transient: Ray retries it."""


class ModelTooLarge(InputError):
    """A model (or an in-memory soup) does not fit the memory of one evaluation actor."""


class StorageAccessError(InputError):
    """Storage refused access or the location does not exist: not transient, a bad input."""


class InvalidDataset(InputError):
    """An evaluation dataset is malformed (not Parquet, missing columns or types, no scorable row, ...)."""
