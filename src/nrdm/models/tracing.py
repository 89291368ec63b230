"""Looking inside the gated units during one forward/backward pass.

`UnitTracer` attaches to (a subset of) a model's `GatedResidual` units for the duration of a
`with` block. Units without a tracer pay one `is None` check, so diagnostics cost nothing when off.

It serves two clients:
- the sensitivity penalty (`keep_inputs=True`): the input z_i and conditioning of each traced
  unit, to evaluate ||alpha_i J_i - beta_i I||^2 after the forward pass;
- diagnostics (`stats=True`): per unit, in call (depth) order,
    adjoint_norm   ||dL/dz_i||, the residual sensitivity (filled in by loss.backward())
    update_ratio   ||gated branch term|| / ||z_i||, e.g. ||alpha_i f_i(z_i)|| / ||z_i|| for nrdm
    <slot>_mean / <slot>_std  statistics of each gate (alpha, beta, ...) over batch and channels
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nrdm.models.gated_unit import Conditioning, GatedResidual, gated_units


@dataclass
class UnitRecord:
    unit: GatedResidual
    z: torch.Tensor | None = None          # detached input (keep_inputs)
    cond: Conditioning | None = None       # conditioning, still in the graph (keep_inputs)
    stats: dict[str, float] = field(default_factory=dict)


class UnitTracer:
    """Context manager that records what the traced units see in the next forward pass.

    A unit called more than once inside the block (e.g. recomputed by gradient checkpointing)
    keeps its first record.
    """

    def __init__(self, model: nn.Module, units: list[GatedResidual] | None = None,
                 keep_inputs: bool | list[GatedResidual] = False, stats: bool = False):
        """units: the units to trace (default all); keep_inputs: True for all traced units, or
        the list of units whose inputs to keep; stats: collect diagnostics."""
        self.units = gated_units(model) if units is None else list(units)
        keep = self.units if keep_inputs is True else (keep_inputs or [])
        self._keep = {id(u) for u in keep}
        self.stats = stats
        self.records: list[UnitRecord] = []
        self._seen: set[int] = set()

    def __enter__(self) -> "UnitTracer":
        for unit in self.units:
            if unit.tracer is not None:
                raise RuntimeError("a GatedResidual unit is already being traced; nested tracers are not supported")
            unit.tracer = self
        return self

    def __exit__(self, *exc) -> None:
        for unit in self.units:
            unit.tracer = None

    def record(self, unit: GatedResidual, z: torch.Tensor, cond: Conditioning,
               gates: dict[str, torch.Tensor], update: torch.Tensor) -> None:
        if id(unit) in self._seen:
            return
        self._seen.add(id(unit))
        rec = UnitRecord(unit)
        if id(unit) in self._keep:
            rec.z, rec.cond = z.detach(), cond
        if self.stats:
            with torch.no_grad():
                rec.stats["update_ratio"] = float(update.float().norm() / z.float().norm().clamp_min(1e-12))
                for name, role, _ in unit.slots:
                    value = gates[role].float()
                    rec.stats[f"{name}_mean"] = float(value.mean())
                    rec.stats[f"{name}_std"] = float(value.std()) if value.numel() > 1 else 0.0
            if z.requires_grad:
                z.register_hook(lambda grad, stats=rec.stats: stats.__setitem__(
                    "adjoint_norm", float(grad.float().norm())))
        self.records.append(rec)

    @property
    def kept(self) -> list[UnitRecord]:
        """Records that carry their unit's input."""
        return [rec for rec in self.records if rec.z is not None]

    def diagnostics(self) -> dict[str, list]:
        """Per-unit statistics as lists in call (depth) order: JSON-ready for the trainer's log.
        Keys missing for a unit (a variant without that gate; adjoint before backward) are None."""
        keys = sorted({k for rec in self.records for k in rec.stats})
        out: dict[str, list] = {"unit_variant": [rec.unit.unit.variant for rec in self.records]}
        for key in keys:
            out[key] = [rec.stats.get(key) for rec in self.records]
        return out


@torch.no_grad()
def gate_profile(model: nn.Module, x: torch.Tensor, condition: torch.Tensor | None = None,
                 times=(0, 100, 250, 500, 750, 999)) -> dict[str, list]:
    """Mean of each gate (alpha, beta, ...) over units, batch and channels at several diffusion
    steps t: {"t": [...], "alpha_mean": [...], ...}. The gates see only the conditioning (t and
    condition), so x only sets the batch; variants without gates return just "t"."""
    was_training = model.training
    model.eval()
    out: dict[str, list] = {"t": list(times)}
    t_vec = torch.empty(len(x), dtype=torch.long, device=x.device)
    for t in times:
        with UnitTracer(model, stats=True) as tracer:
            model(x, t_vec.fill_(t), condition)
        for key, values in tracer.diagnostics().items():
            values = [v for v in values if v is not None]
            if key.endswith("_mean") and values:
                out.setdefault(key, []).append(sum(values) / len(values))
    model.train(was_training)
    return out
