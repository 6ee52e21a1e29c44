"""emotion-stream: classify the emotion of chat messages flowing through Kafka."""

__version__ = "0.1.0"
__all__ = ["__version__"]
