"""What to parallelise and how: ``ParallelConfig`` and its command-line form ``ulysses=2,cfg=2``."""

from __future__ import annotations

from dataclasses import dataclass, fields

SEQUENCE_MODES = ("ulysses", "ring")
HEAD_MODES = ("uneven", "pad")


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of each kind of parallelism; the world size is their product.

    - ``ulysses``: sequence parallelism with all-to-all attention (each rank attends over the whole sequence for a
      subset of the heads).
    - ``ring``: sequence parallelism with ring attention (each rank keeps every head for its own queries and sees
      the other ranks' keys/values one block at a time). One sequence mode at a time.
    - ``cfg``: 2 puts the positive and the negative half of a CFG batch on different ranks.
    - ``heads``: how Ulysses splits a head count that the degree does not divide (30 heads on 4 ranks):
      ``uneven`` (8, 8, 7, 7 heads: no extra FLOPs, uneven all-to-all splits) or ``pad`` (zero heads up to 32).
    """

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    heads: str = "uneven"

    def __post_init__(self):
        for name in ("ulysses", "ring", "cfg"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel {name} degree must be an integer >= 1, got {value!r}")
        if self.cfg > 2:
            raise ValueError(f"parallel cfg degree must be 1 or 2 (a CFG batch has two halves), got {self.cfg}")
        if self.ulysses > 1 and self.ring > 1:
            raise ValueError("choose one sequence-parallel mode: ulysses or ring (not both)")
        if self.heads not in HEAD_MODES:
            raise ValueError(f"parallel heads must be one of {HEAD_MODES}, got {self.heads!r}")

    @property
    def sp(self) -> int:
        """Sequence-parallel degree (ranks that share one sequence)."""
        return self.ulysses * self.ring

    @property
    def sequence_mode(self) -> str | None:
        if self.ulysses > 1:
            return "ulysses"
        if self.ring > 1:
            return "ring"
        return None

    @property
    def world_size(self) -> int:
        return self.sp * self.cfg

    @classmethod
    def parse(cls, text: str) -> ParallelConfig:
        """``"ulysses=2,cfg=2"``, ``"ring=4"``, ``"ulysses=4,heads=pad"``; empty parts are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs: dict = {}
        for part in (p.strip() for p in str(text).split(",")):
            if not part:
                continue
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in known:
                raise ValueError(f"--parallel takes key=value pairs with keys {sorted(known)}, got {part!r}")
            if key == "heads":
                kwargs[key] = value.strip()
            else:
                try:
                    kwargs[key] = int(value)
                except ValueError:
                    raise ValueError(f"--parallel {key} must be an integer, got {value!r}") from None
        return cls(**kwargs)

    def describe(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in ("ulysses", "ring", "cfg") if getattr(self, k) > 1]
        if self.ulysses > 1:
            parts.append(f"heads={self.heads}")
        return ",".join(parts) or "single"
