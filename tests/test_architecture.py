"""docs/architecture.md stays true: no module imports from a later layer than its own, and every module
of the package is in the table."""

from __future__ import annotations

import ast
import re

from conftest import ROOT

PACKAGE = ROOT / "src" / "segmask"


def layers() -> dict[str, int]:
    """Module (or package, with a trailing /) -> layer, from the table in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = {}
    for number, cells in re.findall(r"^\| (\d+) \| (.+) \|$", text, flags=re.M):
        for name in re.findall(r"`([\w/]+)`", cells):
            table[name.rstrip("/")] = int(number)
    return table


def layer_of(module: str, table: dict[str, int]) -> int | None:
    """``tasks.babi`` -> the layer of ``tasks``; ``attention`` -> its own."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in table:
            return table[".".join(parts[:end])]
    return None


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if name.endswith("__init__") or name.endswith("__main__"):
            continue
        found[name] = ast.parse(path.read_text())
    return found


def imported(tree: ast.Module) -> list[str]:
    """segmask modules a module imports at its top level (``from segmask import a`` counts ``a``); a lazy
    import inside a function says why in place."""
    targets = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "segmask":
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("segmask."):
            targets.append(node.module.removeprefix("segmask."))
        elif isinstance(node, ast.Import):
            targets += [a.name.removeprefix("segmask.") for a in node.names if a.name.startswith("segmask.")]
    return targets


def test_every_module_is_in_the_layer_table():
    table = layers()
    missing = [name for name in modules() if layer_of(name, table) is None]
    assert not missing, f"docs/architecture.md gives no layer for {missing}"


def test_no_module_imports_from_a_later_layer():
    table = layers()
    upward = []
    for name, tree in modules().items():
        own = layer_of(name, table)
        for target in imported(tree):
            if target.split(".")[0] == "cli" and name.startswith("cli"):
                continue
            if (layer := layer_of(target, table)) is not None and layer > own:
                upward.append(f"{name} (layer {own}) imports {target} (layer {layer})")
    assert not upward, "\n".join(upward)


def loads_from_outside(source: str, depth: int) -> list[str]:
    """What a module at ``depth`` folders below ``src/segmask`` does to reach files outside the package:
    executing a file by path, or walking up from ``__file__`` past the package's folder."""
    found = [name for name in ("spec_from_file_location", "run_path", "SourceFileLoader") if name in source]
    for match in re.finditer(r"__file__\)?(?:\.resolve\(\))?(\.parents\[(\d+)\]|(?:\.parent(?!s))+)", source):
        up = int(match.group(2)) + 1 if match.group(2) else match.group(1).count(".parent")
        if up > depth + 1:  # .parent is the module's folder; one more per folder up to src/segmask
            found.append(match.group(0))
    return found


def test_the_checker_catches_the_old_demo_shim():
    old = 'Path(__file__).resolve().parents[2] / "experiments" / "demo" / "demo.py"\nspec_from_file_location'
    assert loads_from_outside(old, depth=0) == ["spec_from_file_location", "__file__).resolve().parents[2]"]
    assert loads_from_outside("Path(__file__).parent / 'templates'", depth=0) == []


def test_no_library_module_loads_files_from_outside_the_package():
    """The library never reaches into experiments/, benchmarks/ or the checkout: it is installed alone."""
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        depth = len(path.relative_to(PACKAGE).parts) - 1
        if found := loads_from_outside(path.read_text(), depth):
            offenders[str(path.relative_to(PACKAGE))] = found
    assert not offenders, offenders
