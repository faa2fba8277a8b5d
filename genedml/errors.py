"""One exception family: every error a user can cause derives from GenedmlError and says what to do."""


class GenedmlError(Exception):
    """Base class of all errors genedml raises on purpose (bad input, missing weights, mismatches)."""


class InputError(GenedmlError):
    """An input file or folder is missing, malformed or inconsistent."""


class ImageError(InputError):
    """An image cannot be opened or decoded (missing, unreadable, truncated)."""


class MissingWeightsError(GenedmlError):
    """No pretrained weights were found for a backbone and --random-init was not chosen."""


class WeightsMismatchError(GenedmlError):
    """A weights file does not fit the backbone architecture (missing or unexpected keys)."""


class UnknownBackboneError(GenedmlError):
    """A backbone name is not in the registry."""


class CacheMismatchError(GenedmlError):
    """A feature cache was made with other settings (backbone, weights, geometry) than requested."""


class CacheLockedError(GenedmlError):
    """Another live process holds the lock of a cache sample."""


class ModelDirError(GenedmlError):
    """A model directory is missing files or does not match the data it is used with."""


class ConfigError(GenedmlError):
    """A setting (flag, config file entry, head option) is unknown or out of range."""
