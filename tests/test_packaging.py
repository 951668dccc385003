"""pyproject lists packages by hand (quant/ and cli/ are remapped), so a new subpackage is easy to miss."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_installed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(cfg["packages"]), cfg["package-dir"]
    for pkg, src in dirs.items():
        for init in (ROOT / src).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(ROOT / src).parts
            name = ".".join((pkg, *rel))
            if not any(name.startswith(m + ".") or name == m for m in set(dirs) - {pkg} if len(m) > len(pkg)):
                assert name in listed, f"{init.parent} is not in pyproject's packages (as {name})"
    assert listed <= {".".join((p, *i.parent.relative_to(ROOT / s).parts))
                      for p, s in dirs.items() for i in (ROOT / s).rglob("__init__.py")}, "a listed package has no source"
