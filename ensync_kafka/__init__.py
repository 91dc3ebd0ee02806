"""ensync-kafka: defer Kafka events to a later time, delivered once, by priority."""

from .auditstore import AuditStore
from .client import DeferClient
from .config import Config, load_config
from .consumer import ConsumerStats, PriorityConsumer
from .control import ControlResult
from .dead import DeadLetter, read_dead_letters, redrive_dead_letters
from .exceptions import (
    BrokerError,
    ConfigError,
    EnsyncKafkaError,
    SerializationError,
    ValidationError,
)
from .hooks import TurnPhases, WorkerHooks
from .models import Attempt, DeferRequest, DeliveredEvent, Receipt
from .query import Cluster
from .ratelimit import RateLimit
from .retry import Drop, Postpone, Retry
from .runner import Worker
from .topics import TopicNames, ensure_topics

__all__ = [
    "Attempt",
    "AuditStore",
    "BrokerError",
    "Cluster",
    "Config",
    "ConfigError",
    "ConsumerStats",
    "ControlResult",
    "DeadLetter",
    "DeferClient",
    "DeferRequest",
    "DeliveredEvent",
    "Drop",
    "EnsyncKafkaError",
    "Postpone",
    "PriorityConsumer",
    "RateLimit",
    "Receipt",
    "Retry",
    "SerializationError",
    "TopicNames",
    "TurnPhases",
    "ValidationError",
    "Worker",
    "WorkerHooks",
    "ensure_topics",
    "load_config",
    "read_dead_letters",
    "redrive_dead_letters",
]
