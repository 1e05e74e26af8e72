"""The one exception family of `engines`; the server maps it to HTTP statuses in one place.

    EngineError
    ├── InvalidRequest(param, message)  the request asks for something this model cannot do  → 400
    ├── ModelNotFound(model)            no model directory / id by that name                   → 404
    ├── RenderCancelled                 the caller's `on_step` asked to stop                   → (client gone)
    └── EngineFailure                   the model or its backend failed; not the caller's fault → 500
        └── ModelInvalid                a model directory is unusable (manifest, files, hashes)

Nothing else escapes `engines.load` or `Pipeline.render`: numpy and ONNX Runtime errors are wrapped
in `EngineFailure`, so a bad request can never surface as an unexplained crash.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error raised by `engines`."""


class InvalidRequest(EngineError):
    """The request names a value this model cannot render; `param` is the request field at fault."""

    def __init__(self, param: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.code = code  # the API error code when `invalid_<param>` says too little (lora_not_found)

    def __str__(self) -> str:
        return f"{self.param}: {self.message}"


class ModelNotFound(EngineError):
    def __init__(self, model: str, message: str | None = None) -> None:
        super().__init__(message or f"model {model!r} not found")
        self.model = model


class RenderCancelled(EngineError):
    """Raised from an `on_step` callback to stop a render between steps."""


class EngineFailure(EngineError):
    """The backend or the model failed while rendering or loading."""


class ModelInvalid(EngineFailure):
    """A model directory exists but cannot be used: bad manifest, missing or altered files."""
