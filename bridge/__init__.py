"""qoder-kafka-bridge: Qoder Cloud Agents thread events, republished to Apache Kafka."""

__version__ = "0.1.0"
