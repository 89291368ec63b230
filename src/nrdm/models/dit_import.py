"""DiT weights into the flow backbone with adaLN-Zero units (`nrdm import-dit`).

Two source layouts (Peebles & Xie 2023):
- the official DiT `.pt` state dict (fused qkv, one timestep/label embedder, `adaLN_modulation.1`
  of 6D rows per block; a training checkpoint's "ema" entry is used when present), read with
  `torch.load(weights_only=True)`;
- a diffusers folder of `DiTTransformer2DModel` weights (config.json + safetensors or bin, at the
  top or in `transformer/`): separate q/k/v, a copy of the embedders in every block.

Both map onto FlowTransformer(variant="adaln-zero"). DiT's six modulations per block
[shift, scale, gate] x [attention, MLP] become each unit's gate head slots (gate, scale, shift);
its position table and (for diffusers) its timestep frequencies are kept by `embeddings` = "dit" or
"diffusers"; `learn_sigma` when the output has 2C channels. diffusers' DiT normalises the MLP
input with eps 1e-5 where DiT and this backbone use 1e-6: outputs agree to ~1e-5, not bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# DiT's heads by width (its table 1: S, B, L, XL); the weights do not say how many heads there are
DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
MODULATIONS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")


class DiTImportError(ValueError):
    """A source that is not DiT weights of a supported layout, with what was expected."""


def _gate_heads(block: str, weight: torch.Tensor, bias: torch.Tensor) -> dict:
    """A DiT block's modulation layer (6D rows: shift, scale, gate of attention, then of the MLP) ->
    its two units' gate heads, slots in this backbone's adaLN-Zero order: gate, scale, shift."""
    out = {}
    for kind, tensor in (("weight", weight), ("bias", bias)):
        chunks = dict(zip(MODULATIONS, tensor.chunk(6)))
        for part, unit in (("msa", "attn"), ("mlp", "mlp")):
            roles = [chunks[f"{role}_{part}"] for role in ("gate", "scale", "shift")]
            out[f"{block}{unit}.gates.head.{kind}"] = torch.cat(roles)
    return out


def _renamed(state: dict, names: dict[str, str]) -> dict:
    """This backbone's tensors from the source's: {our layer: their layer}, weight and bias (where present)."""
    return {f"{ours}.{kind}": state[f"{theirs}.{kind}"] for ours, theirs in names.items()
            for kind in ("weight", "bias") if f"{theirs}.{kind}" in state}


def _blocks(state: dict, prefix: str) -> int:
    return len({key.split(".")[1] for key in state if key.startswith(prefix)})


def _need(state: dict, keys: list[str], layout: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise DiTImportError(f"not a DiT state dict in the {layout} layout: missing {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''} (expected keys such as {keys[0]!r})")


def _model_kwargs(width: int, depth: int, patch: int, in_channels: int, out_channels: int, n_tokens: int,
                  table_rows: int, fc1_rows: int, embeddings: str, heads: int | None) -> dict:
    if heads is None:
        if width not in DIT_HEADS:
            raise DiTImportError(f"width {width} is not a published DiT size ({sorted(DIT_HEADS)}): pass heads")
        heads = DIT_HEADS[width]
    if out_channels not in (in_channels, 2 * in_channels):
        raise DiTImportError(f"{out_channels} output channels for {in_channels} input channels: expected "
                             f"{in_channels} or {2 * in_channels} (learned sigma)")
    grid = int(round(n_tokens ** 0.5))
    return dict(backbone="flow", width=width, depth=depth, heads=heads, patch_size=patch, mlp_ratio=fc1_rows / width,
                image_size=grid * patch, in_channels=in_channels, num_classes=table_rows - 1, variant="adaln-zero",
                gate_source="cond", learn_sigma=out_channels == 2 * in_channels, embeddings=embeddings)


def from_official(state: dict, heads: int | None = None) -> tuple[dict, dict]:
    """The official DiT layout -> (build_model keyword arguments, FlowTransformer state dict)."""
    _need(state, ["x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
                  "final_layer.linear.weight", "blocks.0.adaLN_modulation.1.weight", "pos_embed"], "official DiT")
    width, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = _blocks(state, "blocks.")
    out = _renamed(state, {"patch_embed": "x_embedder.proj", "embed.time.mlp.0": "t_embedder.mlp.0",
                           "embed.time.mlp.2": "t_embedder.mlp.2", "embed.label.table": "y_embedder.embedding_table",
                           "final.modulation": "final_layer.adaLN_modulation.1", "final.linear": "final_layer.linear"})
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"blocks.{i}."
        out.update(_gate_heads(dst, state[src + "adaLN_modulation.1.weight"], state[src + "adaLN_modulation.1.bias"]))
        for name in ("qkv", "proj"):
            for kind in ("weight", "bias"):
                out[f"{dst}attn.body.{name}.{kind}"] = state[f"{src}attn.{name}.{kind}"]
        for name in ("fc1", "fc2"):
            for kind in ("weight", "bias"):
                out[f"{dst}mlp.body.{name}.{kind}"] = state[f"{src}mlp.{name}.{kind}"]
    kwargs = _model_kwargs(width, depth, patch, in_channels, state["final_layer.linear.weight"].shape[0] // patch ** 2,
                           state["pos_embed"].shape[1], state["y_embedder.embedding_table.weight"].shape[0],
                           state["blocks.0.mlp.fc1.weight"].shape[0], "dit", heads)
    return kwargs, out


def from_diffusers(state: dict, config: dict) -> tuple[dict, dict]:
    """A diffusers DiTTransformer2DModel (state dict and config.json) -> (kwargs, state dict).
    Its per-block embedders must be copies of one another (as in converted DiT checkpoints)."""
    _need(state, ["pos_embed.proj.weight", "transformer_blocks.0.norm1.linear.weight", "proj_out_2.weight"],
          "diffusers DiTTransformer2DModel")
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise DiTImportError(f"norm_type {config.get('norm_type')!r}: only DiT's ada_norm_zero maps onto adaLN-Zero units")
    depth = _blocks(state, "transformer_blocks.")
    emb = "transformer_blocks.{}.norm1.emb."
    shared = {k[len(emb.format(0)):]: v for k, v in state.items() if k.startswith(emb.format(0))}
    for i in range(1, depth):
        if any(not torch.equal(v, state[emb.format(i) + k]) for k, v in shared.items()):
            raise DiTImportError(f"block {i}'s timestep/class embedder differs from block 0's: this model was trained "
                                 "with untied per-block embedders, which the flow backbone (one embedder) cannot hold")
    width, in_channels, patch, _ = state["pos_embed.proj.weight"].shape
    e = emb.format(0)
    out = _renamed(state, {"patch_embed": "pos_embed.proj", "embed.time.mlp.0": e + "timestep_embedder.linear_1",
                           "embed.time.mlp.2": e + "timestep_embedder.linear_2",
                           "embed.label.table": e + "class_embedder.embedding_table",
                           "final.modulation": "proj_out_1", "final.linear": "proj_out_2"})
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        out.update(_gate_heads(dst, state[src + "norm1.linear.weight"], state[src + "norm1.linear.bias"]))
        for kind in ("weight", "bias"):
            out[f"{dst}attn.body.qkv.{kind}"] = torch.cat([state[f"{src}attn1.to_{x}.{kind}"] for x in "qkv"])
            out[f"{dst}attn.body.proj.{kind}"] = state[f"{src}attn1.to_out.0.{kind}"]
            out[f"{dst}mlp.body.fc1.{kind}"] = state[f"{src}ff.net.0.proj.{kind}"]
            out[f"{dst}mlp.body.fc2.{kind}"] = state[f"{src}ff.net.2.{kind}"]
    heads = config.get("num_attention_heads")
    side = config["sample_size"]
    kwargs = _model_kwargs(width, depth, patch, in_channels, config.get("out_channels") or in_channels,
                           (side // patch) ** 2, shared["class_embedder.embedding_table.weight"].shape[0],
                           state["transformer_blocks.0.ff.net.0.proj.weight"].shape[0], "diffusers", heads)
    return kwargs, out


def _read_tensors(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:      # pickle with code in it, or not a torch file at all
        raise DiTImportError(f"{path} could not be read as a weights-only torch file ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200]}); a DiT checkpoint holds only tensors") from err
    if isinstance(loaded, dict) and isinstance(loaded.get("ema"), dict):
        loaded = loaded["ema"]                                       # a DiT training checkpoint
    elif isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise DiTImportError(f"{path} does not hold a state dict (name -> tensor)")
    return loaded


def load_dit(source: str | Path, heads: int | None = None) -> tuple[dict, dict]:
    """(build_model keyword arguments, FlowTransformer state dict) from a DiT checkpoint file or a
    diffusers folder (the folder itself or its `transformer/` subfolder)."""
    source = Path(source)
    if not source.exists():
        raise DiTImportError(f"{source} does not exist")
    if source.is_dir():
        folder = source / "transformer" if (source / "transformer" / "config.json").exists() else source
        if not (folder / "config.json").exists():
            raise DiTImportError(f"{source} has no config.json (nor transformer/config.json): not a diffusers folder")
        config = json.loads((folder / "config.json").read_text())
        if config.get("_class_name", "DiTTransformer2DModel") != "DiTTransformer2DModel":
            raise DiTImportError(f"{folder} holds a {config['_class_name']}, not a DiTTransformer2DModel")
        files = sorted(folder.glob("diffusion_pytorch_model*.safetensors")) or sorted(folder.glob("*.bin"))
        if not files:
            raise DiTImportError(f"{folder} has no diffusion_pytorch_model*.safetensors or *.bin weights")
        state = {}
        for f in files:
            state.update(_read_tensors(f))
        kwargs, converted = from_diffusers(state, config)
        if heads is not None:
            kwargs["heads"] = heads
        return kwargs, converted
    return from_official(_read_tensors(source), heads)
