"""The code's shape, as the developers' guide sets it: short functions and modules, imports that
point down the layering of docs/architecture.md, no `sys.path` edits, no issue numbers in the package.
Each check lists every offender, so one failure shows all there is to fix."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "clip2gan_cli"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 600
# The training loop's body reads as one sequence of named steps; the model file mirrors NVIDIA's.
LONG_FUNCTIONS_ALLOWED = {("train/trainer.py", "train_loop")}
LONG_FUNCTION_MODULES_ALLOWED = {"stylegan2/networks.py"}
LONG_MODULES_ALLOWED = {"stylegan2/networks.py"}

# docs/architecture.md's layers, highest first: a module imports only from its own layer's unit or below.
LAYERS = [
    ["cli", "__main__", "serve"],  # serve: the web page (clip2gan_cli/serve/), beside the CLI
    ["registry_listing"],
    ["recipes", "refine"],
    ["train", "metrics"],
    ["inputs"],
    ["pipeline", "packs"],
    ["stylegan2", "clip", "text_tower", "tokenizer", "mapper"],
    ["weights", "imageio"],
    ["tomlio", "fileutil", "device"],
    ["errors", "__init__"],
]
RANK = {unit: len(LAYERS) - level for level, units in enumerate(LAYERS) for unit in units}


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_no_function_is_longer_than_the_limit():
    too_long = []
    for path in package_modules():
        name = relative(path)
        if name in LONG_FUNCTION_MODULES_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (name, node.name) not in LONG_FUNCTIONS_ALLOWED:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, "functions over 60 lines:\n" + "\n".join(too_long)


def test_the_allowed_long_function_still_exists():
    # An exemption for a function that was renamed would silently exempt nothing.
    for name, function in LONG_FUNCTIONS_ALLOWED:
        tree = ast.parse((PACKAGE / name).read_text())
        assert any(isinstance(node, ast.FunctionDef) and node.name == function for node in ast.walk(tree)), (name, function)


def test_no_module_is_longer_than_the_limit():
    too_long = [f"{relative(path)} ({count} lines)" for path in package_modules()
                if relative(path) not in LONG_MODULES_ALLOWED
                and (count := len(path.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not too_long, "modules over 600 lines:\n" + "\n".join(too_long)


def test_no_python_file_edits_sys_path():
    edits = []
    for path in sorted(REPO.rglob("*.py")):
        parts = path.relative_to(REPO).parts
        if any(part.startswith(".") or part in {"build", "dist", "node_modules"} for part in parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in {"insert", "append", "extend"} and ast.unparse(node.func.value) == "sys.path"):
                edits.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not edits, "sys.path edits:\n" + "\n".join(edits)


def test_the_package_names_no_issue_numbers():
    # Code says why in its own words; tracker numbers go stale and belong in commit messages.
    pattern = re.compile(r"\bissues?\s*#?\d+", re.IGNORECASE)
    found = [f"{relative(path)}:{number}" for path in package_modules()
             for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "issue references:\n" + "\n".join(found)


def _module_name(path: Path, package_root: Path = PACKAGE) -> list[str]:
    parts = list(path.relative_to(package_root).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported_units(path: Path, package_root: Path = PACKAGE) -> set[str]:
    """The top-level units of clip2gan_cli (`pipeline`, `stylegan2`, ...) that `path` imports, at any depth."""
    here = _module_name(path, package_root)
    package = here if path.name == "__init__.py" else here[:-1]
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            targets = [base + node.module.split(".")] if node.module else [base + [alias.name] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clip2gan_cli"):
            targets = [node.module.split(".")[1:]]
        elif isinstance(node, ast.Import):
            targets = [alias.name.split(".")[1:] for alias in node.names if alias.name.startswith("clip2gan_cli.")]
        else:
            continue
        units.update(target[0] if target and _is_unit(package_root, target[0]) else "__init__" for target in targets)
    return units


def _is_unit(package_root: Path, name: str) -> bool:
    """Whether `name` is a module or subpackage of the package (not a name defined in its __init__)."""
    return (package_root / f"{name}.py").is_file() or (package_root / name).is_dir()


def test_imports_point_down_the_layering():
    upward = []
    for path in package_modules():
        here = _module_name(path)
        unit = here[0] if here else "__init__"
        assert unit in RANK, f"{relative(path)}: unit '{unit}' has no layer here nor in docs/architecture.md"
        for target in sorted(_imported_units(path) - {unit, "__init__"}):
            if RANK.get(target, len(LAYERS) + 1) > RANK[unit]:
                upward.append(f"{relative(path)} imports {target}")
    assert not upward, "imports pointing up the layering:\n" + "\n".join(upward)


def test_the_layering_check_sees_upward_imports(tmp_path):
    # The check above must be able to fail: relative, absolute and function-local imports are all seen.
    fake = tmp_path / "clip2gan_cli"
    (fake / "metrics").mkdir(parents=True)
    (fake / "metrics" / "fid.py").write_text(
        "from ..errors import UserInputError\nimport clip2gan_cli.train.losses\n"
        "from .. import __version__\ndef f():\n    from .. import cli\n    from .report import write_report\n")
    for unit in ("errors", "train", "cli"):
        (fake / f"{unit}.py").write_text("")
    assert _imported_units(fake / "metrics" / "fid.py", fake) == {"errors", "train", "cli", "metrics", "__init__"}


def test_architecture_doc_names_every_module():
    # docs/architecture.md has one line per module; a new module without one makes the map stale.
    doc = (REPO / "docs" / "architecture.md").read_text()
    unnamed = [relative(path) for path in package_modules()
               if path.name != "__init__.py" and f"`{relative(path)}`" not in doc
               and f"- `{path.parent.relative_to(PACKAGE).as_posix()}/`" not in doc]
    assert not unnamed, "modules docs/architecture.md does not name:\n" + "\n".join(unnamed)
