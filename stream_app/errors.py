"""The exception tree of emotion-stream.

```
EmotionStreamError                 base of everything raised on purpose here
├── ConfigError                    settings that cannot work together (not retriable)
├── InputError                     one message is bad; it goes to the dead-letter topic
│   ├── DecodeError                bytes that are not UTF-8 JSON
│   ├── SchemaError                JSON that breaks chat_message.v1
│   ├── EmptyTextError             empty or whitespace-only text
│   └── TextTooLongError           over the configured limit with ``overlong=reject``
├── DataError                      a training/evaluation file with a bad row (names the line)
├── ModelError                     a model folder or checkpoint that cannot be loaded
├── QueueFull                      the batcher is at capacity: wait (backpressure); retriable
├── BatcherClosed                  the batcher was closed (shutdown)
├── EngineError                    an inference engine failed (load or run)
│   └── DeviceOutOfMemoryError     the accelerator ran out of memory (retriable: split the batch)
├── OutputRejectedError            the broker refused one output record (too large, invalid): that
│                                  record's problem, never the worker's
└── InfrastructureError            the broker or the device is gone: stop without committing
```

``retriable`` says whether doing the same thing again may succeed; the pipeline uses it to decide
between split-and-retry, dead-lettering and stopping the worker.
"""

from __future__ import annotations

__all__ = [
    "BatcherClosed",
    "ConfigError",
    "DataError",
    "DecodeError",
    "DeviceOutOfMemoryError",
    "EmotionStreamError",
    "EmptyTextError",
    "EngineError",
    "InfrastructureError",
    "InputError",
    "ModelError",
    "OutputRejectedError",
    "QueueFull",
    "SchemaError",
    "TextTooLongError",
]


class EmotionStreamError(Exception):
    """Base class of every error raised on purpose by emotion-stream."""

    retriable: bool = False


class ConfigError(EmotionStreamError):
    """Settings that are invalid or cannot work together."""


class InputError(EmotionStreamError):
    """One input message is bad. ``reason`` is the short, fixed label used in metrics and dead letters."""

    reason: str = "invalid"


class DecodeError(InputError):
    """The message value is not valid UTF-8 JSON (or is too large to decode)."""

    reason = "undecodable"


class SchemaError(InputError):
    """The message decodes but does not satisfy ``chat_message.v1``."""

    reason = "schema"


class EmptyTextError(InputError):
    """The text is empty or only whitespace."""

    reason = "empty_text"


class TextTooLongError(InputError):
    """The text exceeds the configured limit and the policy is to reject."""

    reason = "text_too_long"


class DataError(EmotionStreamError):
    """A row of a data file cannot be parsed; the message names the file and line."""


class ModelError(EmotionStreamError):
    """A model checkpoint cannot be found or loaded."""


class QueueFull(EmotionStreamError):
    """The batcher holds ``capacity`` items; the caller must wait (backpressure), never grow the queue."""

    retriable = True


class BatcherClosed(EmotionStreamError):
    """The batcher was closed: ``put`` refuses new items, ``get`` raises once the queue is drained."""


class EngineError(EmotionStreamError):
    """An inference engine failed to load or to run."""


class DeviceOutOfMemoryError(EngineError):
    """The accelerator ran out of memory for this batch; a smaller batch may succeed."""

    retriable = True


class OutputRejectedError(EmotionStreamError):
    """The broker refused an output record for something about the record itself (its size, its format).

    Sending the records of a refused batch one by one finds the culprit; it becomes a dead letter.
    """


class InfrastructureError(EmotionStreamError):
    """The broker or the device is unusable; the worker stops without committing."""
