"""The gated residual unit: every residual update of every backbone goes through `GatedResidual`.

One formula covers all residual variants the paper compares (SPEC section 2):

    z' = skip * z  +  gate * f( in_scale * n(z) + in_shift )  +  out_shift

where `n` is the unit's normalisation, `f` its branch body (attention, MLP, conv block, ...)
and each coefficient is either a constant (1 or 0) or a gate produced from the conditioning.
A variant is the choice of which coefficients are gates:

    variant       update                                      gates (slot -> role, start value)
    nrdm     (0)  z + alpha(c) f(n(z)) + beta(c)              alpha -> gate 0, beta -> out_shift 0
    adaln    (1)  z + f(alpha(c) n(z) + beta(c))              alpha -> in_scale 1, beta -> in_shift 0
    scaled-skip(2) alpha(c) z + f(n(z)) + beta(c)             alpha -> skip 1, beta -> out_shift 0
    resnet   (3)  z + f(n(z))                                 none
    rezero   (4)  z + a f(n(z)), a a learned scalar           alpha -> gate 0 (static, scalar)
    adaln-zero    z + g(c) f(n(z) (1 + s(c)) + b(c))          gate -> gate 0, scale -> in_scale 1,
                                                              shift -> in_shift 0
    depth-mup     z + f(n(z)) / sqrt(L)                       none; L = the model's number of units
                                                              (Yang et al. 2023, Tensor Programs VI;
                                                              Bordelon et al. 2023): a fixed 1/sqrt(L)
                                                              branch scale, set by `count_units`
The modulating variants (adaln, adaln-zero) modulate the normalised input, as DiT does; with
`n = Identity` the adaln update is literally `z + f(alpha z + beta)`.

Gates are computed as `start value + raw(c)` where `raw` comes from a `GateGenerator` whose
parameters start at zero, so every variant starts at its start values: nrdm, rezero and
adaln-zero start as the identity map. `gate_init` ("zero"/"one") overrides the start value
of the first slot (alpha, or adaln-zero's gate).

How the conditioning reaches each variant: through the gates when `gate_source="cond"` and the
variant has gates (nrdm, adaln, scaled-skip, adaln-zero). resnet and rezero have no conditioned
parameters (nor has depth-mup), and `gate_source="tdp"` gates see only the diffusion time; for those
`UnitConfig.gates_see_condition` is False and the backbones add the conditioning vector to
their input features (see each backbone's `input_conditioning`).

`fused_gates` computes the same per-unit heads (gate_source "cond") of the whole model as one
linear map, run once per forward by the conditioning embedder (FusedGateHeads): the same function,
parameters and checkpoints, one matmul instead of one per unit.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch
from torch import nn

from nrdm.models.layers import explicit_attention

# variant -> ((slot name, role, start value), ...)
VARIANT_SLOTS: dict[str, tuple[tuple[str, str, float], ...]] = {
    "nrdm": (("alpha", "gate", 0.0), ("beta", "out_shift", 0.0)),
    "adaln": (("alpha", "in_scale", 1.0), ("beta", "in_shift", 0.0)),
    "scaled-skip": (("alpha", "skip", 1.0), ("beta", "out_shift", 0.0)),
    "resnet": (),
    "rezero": (("alpha", "gate", 0.0),),
    "adaln-zero": (("gate", "gate", 0.0), ("scale", "in_scale", 1.0), ("shift", "in_shift", 0.0)),
    "depth-mup": (),
}
VARIANTS = tuple(VARIANT_SLOTS)
VARIANT_IDS = {0: "nrdm", 1: "adaln", 2: "scaled-skip", 3: "resnet", 4: "rezero"}
GATE_INITS = ("auto", "zero", "one")
GATE_SOURCES = ("cond", "tdp", "static", "shared")
GATE_SHAPES = ("channel", "scalar")
MODULATING_VARIANTS = ("adaln", "adaln-zero")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class UnitConfig:
    """How every residual unit of a model combines its branch with the skip path.

    variant:     one of VARIANTS (an int 0-4 is accepted for the paper's numbering)
    gate_init:   "auto" (the variant's own start value), "zero" or "one" for alpha / adaln-zero's gate
    gate_source: "cond"   per-unit zero-initialised linear head on SiLU(c)
                 "shared" adaLN-single (PixArt-alpha): one zero-initialised head on SiLU(c) shared by
                          all units of the same gate shape, plus a learned per-unit embedding
                          (SharedGateHeads; far fewer parameters, the same identity at init)
                 "tdp"    DiMR time-dependent parameters: p(tau) = s p0 + (1 - s) p1,
                          s = sigmoid((1 + w') tau + b), tau = 2n/T - 1 (time only, no MLP)
                 "static" a learned constant (not conditioned)
    gate_shape:  "channel" (one value per channel) or "scalar" (one per unit)
    fused_gates: compute all "cond" heads of the model in one linear map (FusedGateHeads); the same
                 function and checkpoints. Other gate sources have no head to fuse and are unchanged.
    rezero always uses a static scalar gate, as in the ReZero paper.
    """

    variant: str = "nrdm"
    gate_init: str = "auto"
    gate_source: str = "cond"
    gate_shape: str = "channel"
    fused_gates: bool = False

    def __post_init__(self):
        if isinstance(self.variant, int) and self.variant in VARIANT_IDS:
            object.__setattr__(self, "variant", VARIANT_IDS[self.variant])
        _check_choice("variant", self.variant, VARIANTS)
        _check_choice("gate_init", self.gate_init, GATE_INITS)
        _check_choice("gate_source", self.gate_source, GATE_SOURCES)
        _check_choice("gate_shape", self.gate_shape, GATE_SHAPES)
        if not isinstance(self.fused_gates, bool):
            raise ValueError(f"fused_gates must be true or false, got {self.fused_gates!r}")
        if self.variant == "rezero":
            object.__setattr__(self, "gate_source", "static")
            object.__setattr__(self, "gate_shape", "scalar")

    @classmethod
    def parse(cls, unit: "UnitConfig | str | int | dict") -> "UnitConfig":
        if isinstance(unit, UnitConfig):
            return unit
        if isinstance(unit, dict):
            return cls(**unit)
        return cls(variant=unit)

    def with_(self, **changes) -> "UnitConfig":
        return replace(self, **changes)

    @property
    def slots(self) -> tuple[tuple[str, str, float], ...]:
        slots = VARIANT_SLOTS[self.variant]
        if slots and self.gate_init != "auto":
            name, role, _ = slots[0]
            slots = ((name, role, 0.0 if self.gate_init == "zero" else 1.0),) + slots[1:]
        return slots

    @property
    def gates_see_condition(self) -> bool:
        """True when the full conditioning vector (time and class/text) reaches the units through
        their gates; otherwise the backbone must inject it into its input features."""
        return bool(self.slots) and self.gate_source in ("cond", "shared")

    @property
    def norm_affine(self) -> bool:
        """Modulating variants replace the norm's own affine transform by the modulation."""
        return self.variant not in MODULATING_VARIANTS


class Conditioning(NamedTuple):
    """What the gates may look at.

    vec: (B, D) conditioning vector c (time embedding, plus class or pooled text embedding)
    tau: (B,) diffusion time rescaled to [-1, 1] as tau = 2n/T - 1 (for gate_source="tdp")
    shared: gate shape -> (B, n, W) raw gate values of the shared heads (gate_source="shared"), or None
    fused:  per fused unit, (B, n, W) raw gate values of FusedGateHeads (fused_gates), or None
    """

    vec: torch.Tensor
    tau: torch.Tensor
    shared: dict | None = None
    fused: tuple | None = None

    def repeat_each(self, times: int) -> "Conditioning":
        """Each sample's conditioning `times` times in a row: for video backbones that fold the
        frames (or the spatial positions) of each clip into the batch axis."""
        repeat = lambda v: v.repeat_interleave(times, 0)    # noqa: E731
        return Conditioning(repeat(self.vec), repeat(self.tau), self._map_shared(repeat),
                            None if self.fused is None else tuple(map(repeat, self.fused)))

    def detach(self, dtype=None) -> "Conditioning":
        """Constant conditioning (the sensitivity penalty's). The fused gate values are dropped, not
        detached: each unit then computes its own from c, so its head still gets the gradient."""
        return Conditioning(self.vec.detach().to(dtype or self.vec.dtype), self.tau.detach(),
                            self._map_shared(lambda v: v.detach().to(dtype or v.dtype)))

    def _map_shared(self, fn):
        return None if self.shared is None else {k: fn(v) for k, v in self.shared.items()}


class GateGenerator(nn.Module):
    """phi: conditioning -> raw gate values (B or 1, n_slots, width); all parameters that the raw
    values depend on start at zero, so raw = 0 at initialisation."""

    def __init__(self, n_slots: int, channels: int, cond_dim: int, source: str, shape: str):
        super().__init__()
        self.source = source
        width = channels if shape == "channel" else 1
        self.n_slots, self.width, self.cond_dim = n_slots, width, cond_dim
        self.fused_index = None      # set by fuse_gate_heads: this head is row block `fused_index` of FusedGateHeads
        if source == "shared":          # the head is the model's (SharedGateHeads); this unit's own offset
            self.embedding = nn.Parameter(torch.zeros(n_slots, width))
        elif source == "cond":
            self.head = nn.Linear(cond_dim, n_slots * width)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        elif source == "tdp":
            # DiMR: p0 = p1 = the usual init (here raw 0), w = 1 + w', w' = b = 0 at init.
            # These parameters are kept out of weight decay (see no_weight_decay()).
            self.tdp_p0 = nn.Parameter(torch.zeros(n_slots, width))
            self.tdp_p1 = nn.Parameter(torch.zeros(n_slots, width))
            self.tdp_w = nn.Parameter(torch.zeros(n_slots, 1))
            self.tdp_b = nn.Parameter(torch.zeros(n_slots, 1))
        else:
            self.value = nn.Parameter(torch.zeros(n_slots, width))

    @property
    def shape_key(self) -> str:
        return f"{self.n_slots}x{self.width}"

    def forward(self, cond: Conditioning) -> torch.Tensor:
        if self.source == "shared":
            if cond.shared is None:
                raise ValueError("gate_source 'shared' needs the backbone's shared gate heads (count_units builds "
                                 "them on model.embed); this Conditioning carries none")
            return cond.shared[self.shape_key] + self.embedding                    # (B, n, W)
        if self.source == "cond":
            if self.fused_index is not None and cond.fused is not None:
                return cond.fused[self.fused_index]                                # (B, n, W)
            raw = nn.functional.linear(nn.functional.silu(cond.vec), *self.head_weights())   # (B, n*W)
            return raw.view(-1, self.n_slots, self.width)                          # (B, n, W)
        if self.source == "tdp":
            tau = cond.tau.float()[:, None, None]                                  # (B, 1, 1)
            s = torch.sigmoid((1.0 + self.tdp_w) * tau + self.tdp_b)               # (B, n, 1)
            return s * self.tdp_p0 + (1.0 - s) * self.tdp_p1                       # (B, n, W)
        return self.value[None]                                                    # (1, n, W)

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of this unit's head: its own, or its rows of the model's fused head."""
        if self.fused_index is None:
            return self.head.weight, self.head.bias
        return self._fused_heads.rows(self.fused_index)

    def no_weight_decay(self) -> list[str]:
        return ["tdp_p0", "tdp_p1", "tdp_w", "tdp_b"] if self.source == "tdp" else []


class GatedResidual(nn.Module):
    """One residual update z -> z' of the chosen variant around branch `body` (see module doc).

    body:         the residual branch f (its input is the normalised, possibly modulated z)
    channels:     size of the channel axis the gates act on
    cond_dim:     size of the conditioning vector c
    make_norm:    factory `affine -> nn.Module` for the normalisation n in front of the branch
    channel_axis: -1 for tokens (B, N, C), 1 for feature maps (B, C, H, W)
    """

    def __init__(self, body: nn.Module, channels: int, cond_dim: int, unit: UnitConfig,
                 make_norm: Callable[[bool], nn.Module], channel_axis: int = -1):
        super().__init__()
        self.unit = unit
        self.channel_axis = channel_axis
        self.slots = unit.slots
        self.roles = {role: i for i, (_, role, _) in enumerate(self.slots)}
        self.register_buffer("start", torch.tensor([start for _, _, start in self.slots]), persistent=False)
        self.norm = make_norm(unit.norm_affine)
        self.body = body
        self.gates = (GateGenerator(len(self.slots), channels, cond_dim, unit.gate_source, unit.gate_shape)
                      if self.slots else None)
        self.tracer = None  # set by nrdm.models.tracing.UnitTracer; None costs nothing
        self.branch_scale = 1.0  # depth-mup: 1/sqrt(L), set by count_units once the model is built

    def set_model_units(self, count: int) -> None:
        """The model holds `count` gated units (depth-muP's L)."""
        self.branch_scale = count ** -0.5 if self.unit.variant == "depth-mup" else 1.0

    # -- pieces -------------------------------------------------------------------------------
    def gate_values(self, cond: Conditioning, ndim: int) -> dict[str, torch.Tensor]:
        """role -> gate tensor shaped to broadcast against a z with `ndim` dims."""
        if self.gates is None:
            return {}
        values = self.gates(cond) + self.start[:, None]                       # (B|1, n, W)
        shape = [values.shape[0]] + [1] * (ndim - 1)
        shape[self.channel_axis] = values.shape[-1]
        return {role: values[:, i].reshape(shape) for role, i in self.roles.items()}

    def branch(self, z: torch.Tensor, g: dict[str, torch.Tensor]) -> torch.Tensor:
        """f(in_scale * n(z) + in_shift): the branch output before the output gate."""
        h = self.norm(z)
        if "in_scale" in g:
            h = h * g["in_scale"]
        if "in_shift" in g:
            h = h + g["in_shift"]
        return self.body(h)

    # -- the update ---------------------------------------------------------------------------
    def forward(self, z: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        g = self.gate_values(cond, z.ndim)
        update = self.branch(z, g)
        if "gate" in g:
            update = g["gate"] * update
        if self.branch_scale != 1.0:
            update = update * self.branch_scale
        out = g["skip"] * z + update if "skip" in g else z + update
        if "out_shift" in g:
            out = out + g["out_shift"]
        if self.tracer is not None:
            self.tracer.record(self, z, cond, g, update)
        return out

    # -- residual sensitivity (SPEC section 3) -------------------------------------------------
    def sensitivity(self, z: torch.Tensor, cond: Conditioning, probe: torch.Tensor) -> torch.Tensor:
        """Per-sample Hutchinson estimate of ||alpha J - beta I||_F^2 / D at input z.

        J = d branch / d z is the branch Jacobian (D x D per sample, D = z[0].numel()), alpha the
        gate on the branch (1 where the variant has none) and beta the output shift (0 where
        none). With E[v v^T] = I:  E_v ||alpha (J v) - beta v||^2 = ||alpha J - beta I||_F^2.
        J v is one forward-mode Jacobian-vector product (depth-mup: alpha = 1/sqrt(L)). Returns (B,)
        in float32.

        What the penalty may change: this unit's gate generator and branch. The unit's inputs,
        z and the conditioning vector c, are constants here, so the penalty never reshapes the
        units before it nor the shared time/class embedder (which would otherwise shrink the
        gates of every unit at once by moving c).

        It runs with autocast off, in the parameters' own precision (fp32 in mixed-precision
        training): forward-mode AD through conv layers under autocast mixes dtypes, and a sum of
        squared small JVP entries is what half precision rounds worst.
        """
        dtype = next(self.parameters()).dtype
        cond = cond.detach(dtype)
        z, probe = z.detach().to(dtype).contiguous(), probe.to(dtype).contiguous()
        with torch.autocast(z.device.type, enabled=False), explicit_attention():
            g = self.gate_values(cond, z.ndim)
            _, jv = torch.func.jvp(lambda zz: self.branch(zz, g), (z,), (probe,))
            residual = jv * g["gate"] if "gate" in g else jv
            if self.branch_scale != 1.0:
                residual = residual * self.branch_scale
            if "out_shift" in g:
                residual = residual - g["out_shift"] * probe
        return residual.float().pow(2).flatten(1).sum(1) / z[0].numel()


def gated_units(model: nn.Module) -> list[GatedResidual]:
    """All gated residual units of a model (through DDP/compile wrappers), in registration order."""
    return [m for m in model.modules() if isinstance(m, GatedResidual)]


class SharedGateHeads(nn.Module):
    """adaLN-single (Chen et al. 2023, PixArt-alpha) for every variant: one linear head on SiLU(c)
    per gate shape (slots x width), shared by all units of that shape and zero-initialised; each
    unit adds its own learned embedding (GateGenerator source "shared"). Run once per forward by
    the conditioning embedder; its values travel in Conditioning.shared."""

    def __init__(self, shapes: dict[str, tuple[int, int]], cond_dim: int):
        super().__init__()
        self.shapes = shapes
        self.heads = nn.ModuleDict({key: nn.Linear(cond_dim, n * w) for key, (n, w) in shapes.items()})
        for head in self.heads.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        h = nn.functional.silu(vec)
        return {key: head(h).view(-1, *self.shapes[key]) for key, head in self.heads.items()}   # (B, n, W)


class FusedGateHeads(nn.Module):
    """The per-unit gate heads (gate_source "cond") of a whole model as one linear map on SiLU(c),
    as DiT computes a block's six modulations in one layer, here for every unit at once:

        [raw_1 | raw_2 | ... | raw_U] = SiLU(c) [W_1; W_2; ...; W_U]^T + [b_1; ...; b_U]

    one matmul and one SiLU per forward instead of U. Unit i's head is row block i (`rows(i)`), so
    the function and the parameters are the per-unit heads'; the model's state dict keeps the
    per-unit keys (`fuse_gate_heads`). Run once per forward by the conditioning embedder; its
    values travel in Conditioning.fused."""

    def __init__(self, generators: list[GateGenerator], names: list[str]):
        super().__init__()
        self.names = names                                           # each head's module path in the model
        self.shapes = [(g.n_slots, g.width) for g in generators]
        self.sizes = [n * w for n, w in self.shapes]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.linear = nn.Linear(generators[0].cond_dim, sum(self.sizes))
        with torch.no_grad():
            self.linear.weight.copy_(torch.cat([g.head.weight for g in generators]))
            self.linear.bias.copy_(torch.cat([g.head.bias for g in generators]))

    def rows(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(self.starts[index], self.starts[index] + self.sizes[index])
        return self.linear.weight[rows], self.linear.bias[rows]

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.linear(nn.functional.silu(vec))                                # (B, sum n*W)
        return tuple(part.unflatten(1, shape)                                     # (B, n, W) each
                     for part, shape in zip(raw.split(self.sizes, dim=1), self.shapes))


_FUSED = "embed.fused_gates.linear."


def fuse_gate_heads(model: nn.Module) -> None:
    """Move every per-unit "cond" head of `model` into one FusedGateHeads on `model.embed`.

    Checkpoints stay in the per-unit layout both ways: the model's state dict splits the fused
    weight into each unit's `gates.head.weight` / `.bias`, and loading concatenates them, so fused
    and unfused models (and DiT imports) exchange weights freely."""
    generators = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, GateGenerator) and m.source == "cond"]
    if not generators:
        return                                   # no head to fuse (resnet, rezero, depth-mup, other sources)
    if not hasattr(getattr(model, "embed", None), "fused_gates"):
        raise ValueError(f"fused_gates needs a backbone with a conditioning embedder; {type(model).__name__} has none")
    heads = FusedGateHeads([g for _, g in generators], [name for name, _ in generators])
    model.embed.fused_gates = heads
    for index, (_, generator) in enumerate(generators):
        del generator.head
        generator.fused_index = index
        object.__setattr__(generator, "_fused_heads", heads)      # a reference, not a submodule
    model.register_state_dict_post_hook(_split_fused_heads)
    model.register_load_state_dict_pre_hook(_join_fused_heads)


def _split_fused_heads(model, state: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: the fused weight and bias as per-unit head tensors, each where the
    per-unit model has it (after the rest of its unit: the gates are a unit's last module)."""
    heads = model.embed.fused_gates
    parts = {}
    for kind in ("weight", "bias"):
        fused = state.pop(prefix + _FUSED + kind)
        for name, part in zip(heads.names, fused.split(heads.sizes)):
            parts[f"{prefix}{name}.head.{kind}"] = part         # a view of the parameter, as state_dict gives
    order = list(state)
    for name in heads.names:
        unit = prefix + name.removesuffix("gates")
        at = 1 + max((i for i, key in enumerate(order) if key.startswith(unit)), default=len(order) - 1)
        order[at:at] = [f"{prefix}{name}.head.weight", f"{prefix}{name}.head.bias"]
    tensors = {**state, **parts}
    state.clear()
    state.update((key, tensors[key]) for key in order)


def _join_fused_heads(model, state: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys,
                      error_msgs) -> None:
    """load_state_dict pre-hook: per-unit head tensors into the fused weight and bias. A head the
    state lacks keeps the model's current rows and is reported missing (init_from of a shallower run)."""
    heads = model.embed.fused_gates
    if prefix + _FUSED + "weight" in state:
        return                                                        # already fused (not from state_dict())
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{name}.head.{kind}" for name in heads.names]
        if not any(key in state for key in keys):
            continue
        current = getattr(heads.linear, kind).detach().split(heads.sizes)
        parts = []
        for key, own in zip(keys, current):
            if key not in state:
                missing_keys.append(key)
            parts.append(state.pop(key, own))
        state[prefix + _FUSED + kind] = torch.cat([p.to(current[0].dtype) for p in parts])


def count_units(model: nn.Module) -> None:
    """Tell every unit how many gated units the model holds (depth-muP scales every branch by
    1/sqrt(L)); for gate_source "shared", give the model's conditioning embedder (`model.embed`)
    the shared gate heads, and for fused_gates the fused ones. Each backbone calls this at the end
    of its constructor."""
    units = gated_units(model)
    for unit in units:
        unit.set_model_units(len(units))
    shared = [u.gates for u in units if u.gates is not None and u.gates.source == "shared"]
    if shared:
        if not hasattr(getattr(model, "embed", None), "shared_gates"):
            raise ValueError(f"gate_source 'shared' needs a backbone with a conditioning embedder; "
                             f"{type(model).__name__} has none")
        model.embed.shared_gates = SharedGateHeads({g.shape_key: (g.n_slots, g.width) for g in shared},
                                                   shared[0].cond_dim)
    if units and units[0].unit.fused_gates:
        fuse_gate_heads(model)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of parameters to keep out of weight decay: DiMR's time-dependent parameters."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, GateGenerator):
            names.update(f"{prefix}.{n}" for n in module.no_weight_decay())
    return names
