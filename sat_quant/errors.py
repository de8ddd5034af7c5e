"""Exceptions sat_quant raises: each message says what was wrong and which flag or file fixes it."""


class QuantError(Exception):
    """Base class for every error sat_quant raises on purpose."""


class QuantConfigError(QuantError, ValueError):
    """A flag, config file or plan asks for something that cannot work; raised before any weight is touched."""


class QuantBackendError(QuantError, RuntimeError):
    """The requested kernel backend cannot run this format on this device/dtype."""


class CheckpointError(QuantError, RuntimeError):
    """A checkpoint cannot be saved or loaded; the message names the file and the fix."""


class CheckpointWriteError(CheckpointError):
    """A writer could not write its destination (a read-only folder, a full disk, a file-size limit): the environment,
    not the input. The destination is left as it was; the message says what to fix."""
