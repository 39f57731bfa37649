"""Errors moec raises on bad input: each names its cause in one line, so the CLI can print it without a traceback."""


class MoecError(Exception):
    """Base class: an error the user can fix from its message alone."""


class UnsupportedModelError(MoecError):
    """The source is not a Mixtral model moec knows how to trace."""


class CheckpointError(MoecError):
    """A checkpoint directory is incomplete or disagrees with its config.json."""


class PassOptionError(MoecError):
    """A pipeline string names an unknown pass or has malformed options."""


class PreconditionError(MoecError):
    """A pass ran on a graph it cannot handle (e.g. passes in an impossible order)."""


class VerificationError(MoecError):
    """A graph failed verification after a pass."""
