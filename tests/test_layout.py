"""The layout's one-way data flow (files -> data -> models -> train, eval beside training): no module imports
against it. Every import of every module under src/lafs is read with ``ast`` (function-level imports included,
nothing is executed), so a forbidden edge fails here with the module and the import named."""

from __future__ import annotations

import ast
from pathlib import Path

import lafs

SRC = Path(lafs.__file__).resolve().parent

# (importer, imported) top-level parts of lafs: models see neither data nor training, data sees no model,
# evaluation sees no training
FORBIDDEN = {("models", "data"), ("models", "train"), ("eval", "train"), ("data", "models")}


def _module_name(path: Path, root: Path) -> str:
    parts = ("lafs", *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path) -> list[tuple[str, int]]:
    """(absolute module the import names, line) for every import in the file."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            if node.module:
                found.append((target, node.lineno))
            else:  # `from .. import train`: the names are the modules
                found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _part(module: str) -> str | None:
    """The top-level part of lafs a module belongs to (``lafs.eval.report`` -> ``eval``), None outside lafs."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "lafs" else None


def forbidden_imports(root: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        importer = _module_name(path, root)
        for target, line in _imports(path, root):
            edge = (_part(importer), _part(target))
            if edge in FORBIDDEN:
                bad.append(f"{importer} (line {line}) imports {target}: {edge[0]} -> {edge[1]} is against the layout")
    return bad


def test_no_forbidden_import():
    assert forbidden_imports() == []


def test_a_forbidden_import_is_named(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "eval").mkdir()
    (tmp_path / "models" / "x.py").write_text("def f():\n    from ..data.align import to_geometry\n")
    (tmp_path / "eval" / "y.py").write_text("import lafs.train.loop\nfrom .. import train\nfrom . import metrics\n")
    assert forbidden_imports(tmp_path) == [
        "lafs.eval.y (line 1) imports lafs.train.loop: eval -> train is against the layout",
        "lafs.eval.y (line 2) imports lafs.train: eval -> train is against the layout",
        "lafs.models.x (line 2) imports lafs.data.align: models -> data is against the layout",
    ]


# Opening a checkpoint: lafs.io_safe holds the safe loaders and lafs.checkpoint is their one caller. lafs convert
# reads *foreign* weight files (released state dicts, whose pickles may name argparse.Namespace), not lafs
# checkpoints, so its own weights_only torch.load is the one exception.
CHECKPOINT_LOADERS = {"load_checkpoint", "read_safetensors_folder", "load"}  # `load` as in torch.load
READER = "lafs.checkpoint"
FOREIGN_WEIGHTS = {"lafs.convert": {"load"}}


def checkpoint_readers(root: Path = SRC) -> dict[str, set[str]]:
    """Module -> the checkpoint loaders it calls (``torch.load(...)``, ``io_safe.load_checkpoint(...)``, ...)."""
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        if module == "lafs.io_safe":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            # torch.load only when called on torch; the io_safe loaders by name
            if name == "load" and not (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                                       and f.value.id == "torch"):
                continue
            if name in CHECKPOINT_LOADERS:
                found.setdefault(module, set()).add(name)
    return found


def test_one_checkpoint_reader():
    readers = checkpoint_readers()
    assert {m: names for m, names in readers.items() if m != READER and FOREIGN_WEIGHTS.get(m) != names} == {}
    assert readers[READER] == {"load_checkpoint", "read_safetensors_folder"}
