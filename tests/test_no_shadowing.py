"""No file of this repository may take the import name of an installed package or of the standard
library where it can land on ``sys.path``.

Those places are: the repository root (``python -m pytest`` and the benchmarks import from it),
``benchmarks/`` (Python puts a script's own directory first on ``sys.path`` when it runs as
``python benchmarks/X.py``) and every test directory (pytest's default import mode puts a test
file's directory first). A ``benchmarks/kernels.py`` once shadowed the ``kernels`` package that
transformers imports, and half of the suite failed on a fresh install.
"""
import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _names_in(directory: Path) -> set[str]:
    """The top-level import names a directory on sys.path offers: modules and packages."""
    names = set()
    for p in directory.iterdir():
        if p.suffix == ".py":
            names.add(p.stem)
        elif p.is_dir() and (p / "__init__.py").is_file():
            names.add(p.name)
    return names


def _path_entries() -> list[Path]:
    tests = [ROOT / "tests"] + [d for d in (ROOT / "tests").rglob("*") if d.is_dir() and d.name != "__pycache__"]
    return [ROOT, ROOT / "benchmarks", *tests]


def _taken_names() -> dict[str, str]:
    """Import name -> who owns it: every installed distribution but kvray, and the standard library."""
    taken = {name: "the standard library" for name in sys.stdlib_module_names}
    for name, dists in importlib.metadata.packages_distributions().items():
        owners = sorted({d for d in dists if d.lower() != "kvray"})
        if owners:
            taken[name] = f"the installed distribution {', '.join(owners)}"
    return taken


def test_no_module_on_a_sys_path_entry_shadows_an_installed_package():
    taken = _taken_names()
    clashes = [f"{(d / name).relative_to(ROOT)} takes the name of {taken[name]}"
               for d in _path_entries() for name in sorted(_names_in(d)) if name in taken]
    assert not clashes, clashes


def test_the_check_sees_the_clash_that_broke_a_fresh_install(tmp_path):
    """The check above would have caught benchmarks/kernels.py (transformers installs `kernels`)."""
    (tmp_path / "kernels.py").write_text("")
    (tmp_path / "json.py").write_text("")
    taken = _taken_names()
    found = _names_in(tmp_path) & set(taken)
    assert "json" in found
    if "kernels" in importlib.metadata.packages_distributions():
        assert "kernels" in found


def test_benchmark_scripts_drop_their_own_directory_from_sys_path():
    """Every benchmark script that fixes sys.path takes benchmarks/ off it (so a sibling's name can
    never hide a package) and imports its siblings as ``benchmarks.X``."""
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        src = script.read_text()
        assert "sys.path.insert(0, str(ROOT / \"benchmarks\"))" not in src, script.name
        for sibling in _names_in(ROOT / "benchmarks"):
            assert f"\nimport {sibling}\n" not in src and f"\n    import {sibling}\n" not in src, \
                f"{script.name} imports its sibling {sibling} as a top-level module"
