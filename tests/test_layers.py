"""The package's layers import one way: utils and config at the bottom, then data and models,
then diffusion and metrics, then factory (which assembles them), training, lab and cli.
Every `import nrdm....` of a module, including imports inside functions, is checked."""
import ast
from pathlib import Path

import pytest

import nrdm

SRC = Path(nrdm.__file__).parent
# what each layer may import from inside the package (besides itself)
ALLOWED = {
    "utils": set(),
    "config": {"utils"},
    "data": {"utils", "config"},
    "models": {"utils", "config"},
}


def nrdm_imports(path: Path) -> set[str]:
    """Top-level nrdm subpackages/modules imported anywhere in a file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        found.update(name.split(".")[1] for name in names if name.startswith("nrdm.") and name.count(".") >= 1)
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_lower_layers_do_not_import_upwards(layer):
    files = [SRC / f"{layer}.py"] if (SRC / f"{layer}.py").exists() else sorted((SRC / layer).rglob("*.py"))
    assert files
    bad = {f"{f.relative_to(SRC)} imports nrdm.{name}" for f in files
           for name in nrdm_imports(f) - ALLOWED[layer] - {layer}}
    assert not bad, sorted(bad)
