"""docs/architecture.md stays true: no module imports from a later layer than its own, every module of the
package is in the table, no module loads files from outside the package, and the tests mirror the package
(every module has a test module at its mirrored path)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

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


# The vLLM plugin's modules run only inside vLLM (its own venv: make test-vllm), so its model and plugin are
# tested end to end, through an offline LLM and the OpenAI server, rather than one test module each. Each
# such module names the test modules that cover it; they must exist.
COVERED_ELSEWHERE = {
    "integrations/vllm/model.py": ("integrations/vllm/test_offline.py", "integrations/vllm/test_server.py"),
    "integrations/vllm/plugin.py": ("integrations/vllm/test_offline.py", "integrations/vllm/test_server.py"),
}


def mirrored_test(module: str) -> str:
    """``serving/app.py`` -> ``serving/test_app.py``; ``masks.py`` -> ``test_masks.py`` (below tests/)."""
    folder, _, name = module.rpartition("/")
    return f"{folder}/test_{name}" if folder else f"test_{name}"


def missing_tests(package: Path, tests: Path, covered: dict[str, tuple[str, ...]]) -> list[str]:
    """The test modules that ``package``'s modules (but ``__init__``/``__main__``) lack at their mirrored
    path below ``tests``; a module in ``covered`` may instead have all of the test modules it names."""
    missing = []
    for path in sorted(package.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        module = path.relative_to(package).as_posix()
        if (tests / mirrored_test(module)).is_file():
            continue
        if module in covered and all((tests / test).is_file() for test in covered[module]):
            continue
        missing.append(mirrored_test(module))
    return missing


def test_the_mirror_rule_names_the_missing_test_module(tmp_path):
    package, tests = tmp_path / "segmask", tmp_path / "tests"
    for module in ("__init__.py", "masks.py", "cli/__main__.py", "cli/eval.py", "serving/app.py", "x/y.py"):
        (package / module).parent.mkdir(parents=True, exist_ok=True)
        (package / module).touch()
    for test in ("test_masks.py", "cli/test_eval.py", "serving/test_other.py", "x/test_whole.py"):
        (tests / test).parent.mkdir(parents=True, exist_ok=True)
        (tests / test).touch()
    assert missing_tests(package, tests, {}) == ["serving/test_app.py", "x/test_y.py"]
    assert missing_tests(package, tests, {"x/y.py": ("x/test_whole.py",)}) == ["serving/test_app.py"]
    assert missing_tests(package, tests, {"x/y.py": ("x/test_whole.py", "x/test_gone.py")}) == [
        "serving/test_app.py",
        "x/test_y.py",
    ]


def test_every_module_has_a_test_module_at_the_mirrored_path():
    """src/segmask/serving/app.py -> tests/serving/test_app.py, src/segmask/masks.py -> tests/test_masks.py."""
    missing = missing_tests(PACKAGE, ROOT / "tests", COVERED_ELSEWHERE)
    assert not missing, f"no test module at tests/{{{', '.join(missing)}}}"
