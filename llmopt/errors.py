"""The errors llmopt raises for bad input: one readable message each."""


class LLMOptError(Exception):
    """Base class: a user-facing problem with the input, reported as one line."""


class ModelNotFoundError(LLMOptError):
    """The model path or id cannot be found locally."""


class UnsupportedModelError(LLMOptError):
    """The checkpoint's architecture is not one our decoder implements."""


class ContextLengthError(LLMOptError):
    """The prompt plus the requested tokens do not fit the model's context."""


class InvalidParameterError(LLMOptError):
    """A parameter is outside its possible range."""
