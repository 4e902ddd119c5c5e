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


# Size: a module a reader takes in at once. The synthetic-face generator is one long table of drawing rules.
MAX_LINES = 600
LONG_ALLOWED = {"lafs.data.synthetic"}


def long_modules(root: Path = SRC, limit: int = MAX_LINES) -> list[str]:
    return [f"{_module_name(p, root)}: {n} lines (at most {limit})" for p in sorted(root.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > limit and _module_name(p, root) not in LONG_ALLOWED]


def test_no_module_over_600_lines():
    assert long_modules() == []


def test_a_long_module_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "big.py").write_text("x = 1\n" * 601)
    (tmp_path / "data" / "synthetic.py").write_text("x = 1\n" * 700)
    (tmp_path / "ok.py").write_text("x = 1\n" * 600)
    assert long_modules(tmp_path) == ["lafs.big: 601 lines (at most 600)"]


# Entry points live in lafs/cli; the package root is the library's face (the API, config, io, checkpoint, geometry,
# the model-file services). An entry point parses a command line (argparse), defines a top-level ``main`` or runs
# under ``if __name__ == "__main__"``. ``lafs/__main__.py`` (``python -m lafs``) may only hand over to lafs.cli.
ENTRY = "lafs.cli"


def _is_entry_point(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "main":
            return True
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test):
            return True
    return any(isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names)
               or isinstance(n, ast.ImportFrom) and n.module == "argparse" for n in ast.walk(tree))


def root_entry_points(root: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(root.glob("*.py")):
        name = _module_name(path, root)
        if path.name == "__main__.py":
            targets = {t for t, _ in _imports(path, root) if t.startswith("lafs")}
            if targets - {ENTRY}:
                bad.append(f"{name} imports {sorted(targets - {ENTRY})}: it may only hand over to {ENTRY}")
        elif _is_entry_point(ast.parse(path.read_text())):
            bad.append(f"{name} is an entry point: it belongs in lafs/cli/")
    return bad


def test_the_package_root_holds_no_entry_point():
    assert root_entry_points() == []
    assert (SRC / "cli" / "__main__.py").is_file()  # python -m lafs.cli, torchrun -m lafs.cli train ...


def test_a_root_entry_point_is_named(tmp_path):
    (tmp_path / "tool.py").write_text("import argparse\n")
    (tmp_path / "run.py").write_text("def main():\n    pass\n")
    (tmp_path / "lib.py").write_text("def helper():\n    import json\n")
    (tmp_path / "__main__.py").write_text("from .tool import x\n")
    assert root_entry_points(tmp_path) == [
        "lafs.__main__ imports ['lafs.tool']: it may only hand over to lafs.cli",
        "lafs.run is an entry point: it belongs in lafs/cli/",
        "lafs.tool is an entry point: it belongs in lafs/cli/",
    ]
