"""Exception types and the exit codes they map to.

The codes are dcmrecv's, so that scripts and ``RestartPreventExitStatus=``
written for dcmrecv keep working.  Library code raises; only ``cli.main``
turns an exception into an exit code.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """dcmrecv's documented exit codes (see the EXIT CODES section of its man page)."""

    OK = 0
    COMMANDLINE_SYNTAX_ERROR = 1
    INVALID_OUTPUT_DIRECTORY = 45
    CANNOT_START_SCP_AND_LISTEN = 64
    INVALID_ASSOCIATION_CONFIG = 66
    CANNOT_CREATE_TRANSPORT_LAYER = 71


class DcmrecvdError(Exception):
    """Base class: every error that ends the program carries its exit code."""

    exit_code: ExitCode = ExitCode.COMMANDLINE_SYNTAX_ERROR


class UsageError(DcmrecvdError):
    """The command line is malformed (unknown option, bad value, missing file)."""

    exit_code = ExitCode.COMMANDLINE_SYNTAX_ERROR


class ConfigError(DcmrecvdError):
    """A TOML layer is unreadable or holds an invalid value.

    Treated like a command-line syntax error: the TOML is the command line's
    translation, and systemd must not restart-loop on it.
    """

    exit_code = ExitCode.COMMANDLINE_SYNTAX_ERROR

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {reason}")


class ProfileError(DcmrecvdError):
    """An association negotiation profile (asconfig file) is missing or invalid."""

    exit_code = ExitCode.INVALID_ASSOCIATION_CONFIG

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        self.source = source
        self.line = line
        self.reason = reason
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {reason}")


class OutputDirectoryError(DcmrecvdError):
    """The output directory does not exist or is not a directory."""

    exit_code = ExitCode.INVALID_OUTPUT_DIRECTORY


class TransportError(DcmrecvdError):
    """TLS material (key, certificate, CA, CRL, profile) cannot be used."""

    exit_code = ExitCode.CANNOT_CREATE_TRANSPORT_LAYER


class ListenError(DcmrecvdError):
    """The listening socket cannot be bound or adopted."""

    exit_code = ExitCode.CANNOT_START_SCP_AND_LISTEN
