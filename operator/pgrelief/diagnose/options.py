"""The knobs of a diagnosis, checked once where they are made.

Kept apart from the engine so the CLI, a policy and the tests can build and validate options
without touching the counting: a bad combination fails here with one clear line.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgrelief import advice


class OptionsError(ValueError):
    """Diagnose options that contradict each other or are out of range."""


@dataclass(frozen=True, slots=True)
class DiagnoseOptions:
    """Thresholds of the findings; the CLI flags and a policy's pressure map onto these."""

    idle_after_s: float = 1800.0
    idle_in_transaction_after_s: float = 60.0
    long_running_after_s: float = 300.0
    warning_percent: int = 70
    critical_percent: int = 90
    memory_bytes: int | None = None  # --memory: enables the memory_overcommit finding
    stack: str | None = None  # forces the ORM advice: sqlalchemy | django | rails | hikaricp

    def __post_init__(self) -> None:
        for name in ("idle_after_s", "idle_in_transaction_after_s", "long_running_after_s"):
            if getattr(self, name) < 0:
                raise OptionsError(f"{name} must not be negative")
        if not 0 < self.warning_percent <= self.critical_percent:
            raise OptionsError(
                "pressure thresholds need 0 < warning_percent <= critical_percent, got "
                f"{self.warning_percent} and {self.critical_percent}"
            )
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise OptionsError("memory must be a positive size")
        if self.stack is not None and self.stack not in advice.STACKS:
            raise OptionsError(
                f"unknown stack {self.stack!r}; expected one of {', '.join(advice.STACKS)}"
            )


DEFAULT_OPTIONS = DiagnoseOptions()
