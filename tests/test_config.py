"""Config schema: presets, YAML, overrides, and errors that name the valid keys."""
from pathlib import Path

import pytest
import torch

from nrdm.config import load_config, presets, valid_keys
from nrdm.factory import build_model_from_config, validate
from nrdm.models import count_parameters


def test_required_keys_exist():
    for key in ["train.steps", "train.batch_size", "train.ckpt_every", "model.depth", "model.width",
                "model.variant", "model.backbone", "data.name"]:
        assert key in valid_keys()


def test_unknown_key_suggests_the_nearest_keys(tmp_path):
    """A misspelt key names its nearest valid keys and where the full list is, in one short line
    (the whole list of ~70 keys was 1.4 KB)."""
    with pytest.raises(ValueError, match=r"unknown config key 'train.stpes'; did you mean 'train.steps'") as err:
        load_config("digits", ["train.stpes=3"])
    assert len(str(err.value)) < 250 and "nrdm info digits --config" in str(err.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: 64\n")
    with pytest.raises(ValueError, match=r"unknown config key 'model.widht'; did you mean 'model.width'"):
        load_config(bad)
    with pytest.raises(ValueError, match=r"unknown config key 'model.colour'; All keys"):
        load_config("digits", ["model.colour=3"])
    bad.write_text("modle:\n  width: 64\n")
    with pytest.raises(ValueError, match=r"unknown config key 'modle'"):
        load_config(bad)


def test_type_errors_and_overrides():
    with pytest.raises(ValueError, match=r"'train.steps' expects int, got 'many'"):
        load_config("digits", ["train.steps=many"])
    with pytest.raises(ValueError, match="must look like section.key=value"):
        load_config("digits", ["train.steps"])
    cfg = load_config("digits", ["train.lr=1", "model.channel_mult=[1, 2]", "model.variant=resnet"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.channel_mult == [1, 2] and cfg.model.variant == "resnet"
    with pytest.raises(ValueError, match="no preset or file 'nope'; presets: .*digits"):
        load_config("nope")


def test_validate_names_allowed_values():
    with pytest.raises(ValueError, match="allowed: fp32, bf16, fp16"):
        validate(load_config("digits", ["train.precision=fp8"]))
    with pytest.raises(ValueError, match="allowed: nrdm, adaln"):
        validate(load_config("digits", ["model.variant=highway"]))
    with pytest.raises(ValueError, match="train.steps=0"):
        validate(load_config("digits", ["train.steps=0"]))
    # FSDP2 refuses non-contiguous parameters deep inside torchrun's workers: say so before starting
    with pytest.raises(ValueError, match="channels_last with train.parallel=fsdp.*train.parallel=ddp"):
        validate(load_config("digits", ["train.channels_last=true", "train.parallel=fsdp"]))
    validate(load_config("digits", ["train.channels_last=true", "train.parallel=ddp"]))
    with pytest.raises(ValueError, match="fused_gates with train.parallel=fsdp.*model.fused_gates=false"):
        validate(load_config("digits-flow", ["model.fused_gates=true", "train.parallel=fsdp"]))
    validate(load_config("digits-flow", ["model.fused_gates=true", "train.parallel=ddp"]))


@pytest.mark.parametrize("name", presets())
def test_every_preset_validates_and_builds(name):
    """GPU-sized presets are built on the meta device: no memory, just shapes and counts."""
    cfg = load_config(name)
    validate(cfg)
    with torch.device("meta"):
        model = build_model_from_config(cfg)
    assert count_parameters(model) > 0


def test_gpu_presets_have_published_shapes():
    with torch.device("meta"):
        dit = build_model_from_config(load_config("dit-xl2-imagenet256", ["model.variant=adaln-zero"]))
        uvit = build_model_from_config(load_config("uvit-h2-imagenet256", ["model.variant=resnet"]))
    assert (dit.in_channels, dit.image_size, dit.num_classes) == (4, 32, 1000)
    assert abs(count_parameters(dit) / 1e6 - 675) < 1          # DiT-XL/2: 675M
    assert abs(count_parameters(uvit) / 1e6 - 501) < 3         # U-ViT-H/2: 501M
    with torch.device("meta"):
        dimr2 = build_model_from_config(load_config("dimr-xl2r-imagenet256"))
        dimr3 = build_model_from_config(load_config("dimr-xl3r-imagenet512"))
    assert (dimr3.image_size, dimr3.branch_sizes) == (64, [16, 32, 64])
    assert abs(count_parameters(dimr2) / 1e6 - 505) < 505 * 0.03      # DiMR-XL/2R: 505M
    assert abs(count_parameters(dimr3) / 1e6 - 525) < 525 * 0.03      # DiMR-XL/3R at 512 px: 525M


def test_readme_config_table_lists_every_key():
    """The README's configuration table names every key of the schema, in its section's row."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in readme.splitlines() if line.startswith("| `")}
    missing = [key for key in valid_keys() if f"`{key.split('.', 1)[1]}`" not in rows.get(key.split(".")[0], "")]
    assert not missing, f"README.md's config table lacks {missing}"


def test_readme_command_block_lists_every_command():
    """The README's command-line block shows every `nrdm` command (and `--prompt`)."""
    import argparse

    from nrdm.cli import build_parser
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("## Command line and configuration", 1)[1].split("```", 2)[1]
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [name for name in sub.choices if f"nrdm {name} " not in block]
    assert not missing and "--prompt" in block, missing


def test_float_keys_accept_yaml_exponents():
    """YAML 1.1 reads 1e-4 as a string; float keys take it as the number."""
    assert load_config("digits", ["train.lr=1e-4"]).train.lr == 1e-4
    with pytest.raises(ValueError, match="expects float"):
        load_config("digits", ["train.lr=fast"])


def test_switching_backbone_needs_no_nulling_of_the_others_options():
    """The digits preset sets U-Net options (channel_mult, attention_resolution); a flow model
    from it ignores them, saying so, instead of failing on them."""
    cfg = load_config("digits", ["model.size=null", "model.backbone=flow", "model.width=16", "model.depth=1",
                                 "model.heads=2", "model.patch_size=4"])
    with pytest.warns(UserWarning, match="model.channel_mult=\\[1, 2, 2\\] is not an option of backbone 'flow'"):
        model = build_model_from_config(cfg)
    assert type(model).__name__ == "FlowTransformer" and "channel_mult" not in model.build_args
    with pytest.raises(ValueError, match="model.size 'UNet-T' is a unet size but model.backbone is 'flow': unset"):
        build_model_from_config(load_config("digits", ["model.backbone=flow"]))
    with pytest.raises(ValueError, match="unknown option\\(s\\) \\['channel_mult'\\] for backbone 'flow'"):
        from nrdm.models import build_model
        build_model(backbone="flow", channel_mult=(1, 2), image_size=8, in_channels=1)
