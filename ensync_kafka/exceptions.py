"""Every error ensync-kafka raises derives from :class:`EnsyncKafkaError`.

Driver errors (confluent-kafka, fastavro, rocksdict) are wrapped at the boundary with
``raise ... from exc`` so callers catch one tree and still see the cause.
"""

from __future__ import annotations


class EnsyncKafkaError(Exception):
    """An ensync-kafka operation failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(EnsyncKafkaError):
    """The configuration is invalid."""


class ValidationError(EnsyncKafkaError):
    """A deferral request is invalid; nothing was sent."""


class SerializationError(EnsyncKafkaError):
    """A record could not be encoded or decoded with its Avro schema."""


class BrokerError(EnsyncKafkaError):
    """Kafka refused or failed an operation.

    ``code`` keeps the librdkafka error code (``confluent_kafka.KafkaError``) when there is one.
    """

    def __init__(self, message: str | None = None, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class LocalBrokerError(EnsyncKafkaError):
    """The local development broker could not be provisioned, started or stopped."""
