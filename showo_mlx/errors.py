"""Typed exceptions. Every user-facing failure raises a `ShowoError` whose message is one line that
names the problem and the fix; the CLI prints it and exits with code 2."""


class ShowoError(Exception):
    """Base class of every error showo-mlx raises on bad input."""


class ShowoConfigError(ShowoError):
    """A config.json is missing, malformed, or describes another model."""


class CheckpointError(ShowoError):
    """A weight file is missing, corrupt, unsafe, or does not match the model."""


class OutputExistsError(ShowoError):
    """The destination exists and overwriting was not requested."""


class ImageInputError(ShowoError):
    """An image or mask could not be read or used."""


class GenerationInputError(ShowoError):
    """Bad generation or answering parameters (steps, guidance, schedule, direction, ...)."""


class TrainingConfigError(ShowoError):
    """Bad training config, data, or resume state."""


class OutputWriteError(ShowoError):
    """An output file or folder could not be created or written (permissions, disk, bad parent)."""


class AttentionBackendError(ShowoError):
    """The attention backend forced with SHOWO_ATTENTION is unknown or not available here."""


class UnsafeOutputError(ShowoError):
    """The output folder is an input, holds or sits inside one, is a protected place (/, home, the
    current directory), or is not a previous output of the same command, so replacing it could lose data."""


class TrainingDivergedError(ShowoError):
    """Training met NaN/Inf losses, gradients or weights; the last good checkpoints are kept.
    `showo train` exits with code 3."""

    exit_code = 3


class DistributedError(ShowoError):
    """A data-parallel collective failed or another process died. `showo train` exits with code 4."""

    exit_code = 4
