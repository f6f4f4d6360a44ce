"""What a cache did during one request: one record per model evaluation, and the summary in ``stats["cache"]``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CacheStats:
    config: dict
    n_layers: int = 0
    records: list[dict] = field(default_factory=list)

    def record(self, **rec) -> None:
        self.records.append(rec)

    def summary(self) -> dict:
        recs = self.records
        evals = sum(r["layers"] for r in recs)
        uncached = self.n_layers * len(recs)
        computed = [r for r in recs if r["computed"]]
        return {
            "method": self.config["method"],
            "threshold": self.config["threshold"],
            "config": self.config,
            "forwards": len(recs),
            "computed_forwards": len(computed),
            "reused_forwards": len(recs) - len(computed),
            "computed_steps": sorted({r["step"] for r in computed}),
            "reused_steps": sorted({r["step"] for r in recs if not r["computed"]}),
            "main_layers": self.n_layers,
            "main_layer_evals": evals,
            "main_layer_evals_uncached": uncached,
            # × batch: with CFG a layer call runs positive and negative together; truncation changes the batch
            "main_layer_sequence_evals": sum(r["layers"] * r["batch"] for r in recs),
            "main_layer_sequence_evals_uncached": sum(self.n_layers * r["batch"] for r in recs),
            "evals_saved_factor": (uncached / evals) if evals else None,
            "resets": sum(r["reason"] == "reset" for r in recs),
            "decisions": [dict(r) for r in recs],
        }
