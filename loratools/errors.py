"""The exceptions loratools raises.

Every error derives from :class:`LoraToolsError` and, where one fits, from the matching builtin,
so ``except FileNotFoundError`` keeps working for callers who do not know loratools::

    LoraToolsError
    ├── AdapterNotFoundError        (FileNotFoundError)  an adapter path or file is missing
    ├── CheckpointNotFoundError     (FileNotFoundError)  a base / merged checkpoint is missing
    ├── CorruptFileError            (ValueError)         truncated or malformed safetensors / JSON / pickle
    ├── AdapterFormatError          (ValueError)         not an adapter we can read, or keys left over
    │   └── NotAnAdapterError                            no format recognises the path at all
    ├── UnsupportedAdapterError     (ValueError)         a real adapter whose math is not a plain delta
    ├── ShapeMismatchError          (ValueError)         factors that do not fit their base tensor
    ├── UnboundModuleError          (LookupError)        an adapter module with no tensor in the base
    ├── LayoutAmbiguousError        (ValueError)         shapes cannot tell the orientation
    ├── NonFiniteError              (ValueError)         NaN or Inf in an input or a result
    ├── OutputExistsError           (FileExistsError)    OUT exists and --overwrite was not given
    ├── InvalidArgumentError        (ValueError)         arguments that contradict each other
    ├── VerificationError           (ValueError)         a written output does not hold what it should
    ├── ProvenanceError             (ValueError)         an adapter that was never merged into MERGED
    ├── HubError                    (OSError)            a Hub repo, revision or file that cannot be had
    └── InternalError               (RuntimeError)       an invariant of loratools broke: a bug, please report

The library never prints or exits; the CLI renders ``str(error)`` and exits 1.
Each error keeps what its message names (``path``, ``tensor``, ``expected``, ``actual``) and an
optional ``hint`` — the next thing the user should do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "LoraToolsError",
    "AdapterNotFoundError",
    "CheckpointNotFoundError",
    "CorruptFileError",
    "AdapterFormatError",
    "NotAnAdapterError",
    "UnsupportedAdapterError",
    "ShapeMismatchError",
    "UnboundModuleError",
    "LayoutAmbiguousError",
    "NonFiniteError",
    "OutputExistsError",
    "InvalidArgumentError",
    "VerificationError",
    "ProvenanceError",
    "HubError",
    "InternalError",
]


class LoraToolsError(Exception):
    """Root of every loratools error. ``str()`` is a complete, user-facing message."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        tensor: str | None = None,
        expected: Any = None,
        actual: Any = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.tensor = tensor
        self.expected = expected
        self.actual = actual
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n{self.hint}"
        return self.message


class AdapterNotFoundError(LoraToolsError, FileNotFoundError):
    pass


class CheckpointNotFoundError(LoraToolsError, FileNotFoundError):
    pass


class CorruptFileError(LoraToolsError, ValueError):
    pass


class AdapterFormatError(LoraToolsError, ValueError):
    pass


class NotAnAdapterError(AdapterFormatError):
    """No format recognises the path (as opposed to a recognised adapter that is broken)."""


class UnsupportedAdapterError(LoraToolsError, ValueError):
    pass


class ShapeMismatchError(LoraToolsError, ValueError):
    pass


class UnboundModuleError(LoraToolsError, LookupError):
    pass


class LayoutAmbiguousError(LoraToolsError, ValueError):
    pass


class NonFiniteError(LoraToolsError, ValueError):
    pass


class OutputExistsError(LoraToolsError, FileExistsError):
    pass


class InvalidArgumentError(LoraToolsError, ValueError):
    pass


class VerificationError(LoraToolsError, ValueError):
    pass


class ProvenanceError(LoraToolsError, ValueError):
    pass


class HubError(LoraToolsError, OSError):
    pass


class InternalError(LoraToolsError, RuntimeError):
    """An invariant of loratools itself broke (not the user's input): the message asks for a report."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("hint", "This is a bug in loratools; please report it with the command you ran.")
        super().__init__(f"internal error: {message}", **kwargs)
