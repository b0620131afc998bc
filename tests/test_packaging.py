"""The wheel ships every subpackage and the kernel sources (pyproject lists them by hand)."""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def listed() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_subpackage_is_listed_for_the_wheel():
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "mlx_flash").rglob("__init__.py")}
    assert found <= set(listed()), f"add to pyproject's packages: {sorted(found - set(listed()))}"


def test_the_kernel_sources_ship_as_a_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "mlx_flash.kernel_sources" in config["packages"]
    assert config["package-dir"]["mlx_flash.kernel_sources"] == "kernels"
    sources = set(config["package-data"]["mlx_flash.kernel_sources"])
    assert {"*.c", "*.metal", "*.cu"} <= sources
    assert (ROOT / "kernels" / "cpu_kernels.c").is_file()
