"""The core's exception tree: every failure is transient (retry) or permanent."""


class GatewayError(Exception):
    """Base of all medgw core errors."""


class TransientError(GatewayError):
    """Worth retrying: peer down, timeout, busy, negative ACK that may clear."""


class PermanentError(GatewayError):
    """Retrying cannot help: the destination rejects this message for good."""


class ConfigError(GatewayError):
    """The configuration is invalid; ``problems`` lists each one with its path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class JournalError(TransientError):
    """The journal could not make a message durable (disk full, I/O error)."""


class DiskFullError(JournalError):
    """Free space in the state folder is below the configured watermark."""
