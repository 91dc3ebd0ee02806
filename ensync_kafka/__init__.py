"""ensync-kafka: defer Kafka events to a later time, delivered once, by priority."""

from .client import DeferClient
from .config import Config, load_config
from .exceptions import (
    BrokerError,
    ConfigError,
    EnsyncKafkaError,
    SerializationError,
    ValidationError,
)
from .hooks import WorkerHooks
from .models import Attempt, DeferRequest, DeliveredEvent, Receipt
from .topics import TopicNames, ensure_topics
from .worker import Worker

__all__ = [
    "Attempt",
    "BrokerError",
    "Config",
    "ConfigError",
    "DeferClient",
    "DeferRequest",
    "DeliveredEvent",
    "EnsyncKafkaError",
    "Receipt",
    "SerializationError",
    "TopicNames",
    "ValidationError",
    "Worker",
    "WorkerHooks",
    "ensure_topics",
    "load_config",
]
