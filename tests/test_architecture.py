"""The package's imports run one way (README, "Architecture"): read every module's imports, including those inside
functions, and fail on a cycle or an arrow that points the wrong way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "alexrepro"

# Subpackage → the subpackages it may import. The CLI sits on top; core at the bottom imports nothing of the
# project. Benchmarks time the stages, so they sit beside the CLI, below it.
ALLOWED = {
    "cli": {"core", "data", "model", "train", "evaluate", "synth", "bench"},
    "bench": {"core", "data", "model", "train", "synth"},
    "evaluate": {"core", "data", "model", "train", "synth"},
    "train": {"core", "data", "model"},
    "model": {"core", "data"},
    "synth": {"core"},
    "data": {"core"},
    "core": set(),
}
# Modules every layer may read: the torch-free config of a stage (the report names the training recipe's defaults).
CONFIG_MODULES = {"alexrepro.train.config", "alexrepro.model.config", "alexrepro.data.config"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """The alexrepro modules `path` imports anywhere in its body (module level, functions, TYPE_CHECKING blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("alexrepro")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alexrepro"):
            for alias in node.names:  # `from alexrepro.data import imaging` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _is_module(sub) else node.module)
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(path): project_imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def test_every_module_lives_in_a_subpackage():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert not loose, f"modules outside a subpackage: {loose}; put each where its concern lives"
    assert set(ALLOWED) == {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}


def test_no_import_points_the_wrong_way():
    wrong = []
    for module, imports in graph().items():
        own = subpackage(module)
        if own is None:
            continue
        for target in imports:
            theirs = subpackage(target)
            if theirs in (None, own) or target in CONFIG_MODULES and own != "core":
                continue
            if theirs not in ALLOWED[own]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the allowed directions:\n" + "\n".join(sorted(wrong))


def test_the_cli_is_imported_by_nothing():
    importers = [m for m, imports in graph().items() if subpackage(m) != "cli" and m != "alexrepro.__main__"
                 and any(t == "alexrepro.cli" or t.startswith("alexrepro.cli.") for t in imports)]  # fmt: skip
    assert not importers, importers


def test_no_circle_between_modules():
    edges = graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if target not in edges:
                continue
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (circle := visit(start)):
            pytest.fail("import circle: " + " -> ".join(circle))


def test_the_rule_would_catch_a_wrong_arrow(tmp_path, monkeypatch):
    """The check itself can fail: a core module that imports a stage is reported."""
    fake = tmp_path / "alexrepro"
    for path in PACKAGE.rglob("*.py"):
        target = fake / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (fake / "core" / "errors.py").write_text("from alexrepro.train.loop import train\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match="alexrepro.core.errors -> alexrepro.train.loop"):
        test_no_import_points_the_wrong_way()


@pytest.mark.parametrize(
    "module", ["alexrepro.train.config", "alexrepro.data.config", "alexrepro.model.config",
               "alexrepro.evaluate.config", "alexrepro.synth.config", "alexrepro.cli.configdoc"],
)  # fmt: skip
def test_configs_import_no_torch(module):
    """Help, validation and the report read the stages' configs without paying for torch's import."""
    code = f"import sys, {module}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_bad_flag_is_refused_before_torch_is_imported(tmp_path):
    """A mistyped value fails in a fraction of a second: the stage (and torch) is imported only after the config,
    the paths and the output folder are known good."""
    code = (
        "import sys\n"
        "from alexrepro.cli.app import main\n"
        f"sys.argv = ['alexrepro', 'train', {str(tmp_path)!r}, {str(tmp_path)!r}, {str(tmp_path / 'out')!r},"
        " '--set', 'epochs=-1']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    code = exit.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "epochs" in result.stderr
