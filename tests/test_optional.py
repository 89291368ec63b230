"""Missing optional packages and failed hub loads end in errors that say what to install or do."""
import sys

import pytest

from nrdm.cli import main as cli_main
from nrdm.models.autoencoder import DiffusersVAE
from nrdm.models.text_encoders import TransformersText
from nrdm.utils.optional import MissingDependency


@pytest.mark.parametrize("module,make,extra", [
    ("diffusers", lambda: DiffusersVAE("stabilityai/sd-vae-ft-ema"), "latent"),
    ("transformers", lambda: TransformersText("openai/clip-vit-large-patch14"), "text"),
])
def test_missing_optional_package_names_the_extra(monkeypatch, module, make, extra):
    monkeypatch.setitem(sys.modules, module, None)          # import fails as if not installed
    with pytest.raises(MissingDependency, match=rf'pip install -e "\.\[{extra}\]"'):
        make()


def test_failed_load_says_what_failed(tmp_path):
    pytest.importorskip("diffusers")
    with pytest.raises(ValueError, match=r"(?s)could not load the VAE .*no-such-vae.*Pass a local directory"):
        DiffusersVAE(str(tmp_path / "no-such-vae"))


def test_cli_reports_a_missing_package_without_a_traceback(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    code = cli_main(["latents", "digits", "--set", "data.vae=stabilityai/sd-vae-ft-ema", "--set", "data.latent_channels=4",
                     "--set", "data.image_size=16", "--set", "data.vae_downsample=8"])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install -e ".[latent]"' in err and "Traceback" not in err
