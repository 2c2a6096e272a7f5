"""Digests of the code a cached artefact depends on: a module's import closure within ``madlib``.

A cache key that hashes a hand-written list of file names breaks when a file moves and misses
code added to a module it did not list. :func:`code_hash` instead follows the module's
``madlib`` imports at module level (``from . import data``, ``from .zoo import pad_batch``,
``import madlib.x``), recursively, and hashes the code it reaches. Imports written inside a
function are not followed: the package uses them to break cycles towards a module's callers
(``zoo.get_model`` imports ``quirky``, which imports ``zoo``), not for the code a training or
extraction runs.

The digest is over the code's *definitions*, not its files: each top-level statement of each
module in the closure, parsed, with import statements and docstrings dropped and comments and
layout gone with the parse (:func:`statements`), hashed, and the hashes sorted. So moving a module,
moving a function from one module to another, rewriting the imports that follow, or editing a
comment or a docstring keeps the digest (and every cached model, SAE and feature keyed by it);
changing what any statement computes changes it.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "madlib"
ROOT = Path(__file__).parent


def module_file(module: str, root: Path | None = None) -> Path | None:
    """The source file of ``madlib.<...>`` (a module or a package's ``__init__``) in the package
    folder ``root`` (the imported package's by default), or ``None``."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = Path(root or ROOT).joinpath(*parts[1:])
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _resolve(module: str, node: ast.ImportFrom, root: Path | None = None) -> list[str]:
    """The ``madlib`` modules an ``ImportFrom`` at module level of ``module`` names."""
    if node.level:
        package = module.split(".")
        if module_file(module, root) is not None and module_file(module, root).name != "__init__.py":
            package = package[:-1]
        package = package[: len(package) - (node.level - 1)]
        target = ".".join(package + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    out = [target] if module_file(target, root) else []
    out += [f"{target}.{a.name}" for a in node.names if module_file(f"{target}.{a.name}", root)]  # from . import data
    return out


def imported(tree: ast.Module, module: str = PACKAGE, nested: bool = False, root: Path | None = None) -> list[str]:
    """The ``madlib`` modules a parsed source imports: at module level, or anywhere (``nested``,
    imports inside functions too). ``module`` is the importing module's name (for relative imports);
    code outside the package (a notebook's cells) passes the package name."""
    out: list[str] = []
    for node in ast.walk(tree) if nested else tree.body:
        if isinstance(node, ast.ImportFrom):
            out += _resolve(module, node, root)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if module_file(a.name, root)]
    return sorted(set(out))


def imports(module: str, nested: bool = False, root: Path | None = None) -> list[str]:
    """The ``madlib`` modules ``module`` imports at module level (anywhere, with ``nested``)."""
    path = module_file(module, root)
    if path is None:
        raise ValueError(f"module={module!r} is not accepted; give a module of the {PACKAGE} package, e.g. 'madlib.models.quirky'")
    return imported(ast.parse(path.read_text()), module, nested, root)


def closure(*modules: str, nested: bool = False, root: Path | None = None) -> list[str]:
    """``modules`` and every ``madlib`` module they reach through module-level imports (through
    every import, inside functions too, with ``nested``: what code that calls them may run)."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(imports(m, nested, root))
    return sorted(seen)


def _is_docstring(stmt: ast.stmt) -> bool:
    """A bare string statement: a module's, class's or function's docstring, or the docstring of an
    attribute written under it. It computes nothing."""
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _strip(node: ast.AST) -> ast.AST:
    """``node`` without import statements and docstrings (every bare string statement), at every
    depth (in place)."""
    for child in ast.walk(node):
        body = getattr(child, "body", None)
        if not isinstance(body, list):
            continue
        kept = [s for s in body if not isinstance(s, (ast.Import, ast.ImportFrom)) and not _is_docstring(s)]
        child.body = kept or [ast.Pass()]
    return node


def statements(source: str) -> list[str]:
    """The top-level statements of a module's source as :func:`code_hash` sees them: parsed and
    printed back without imports, docstrings, comments or layout."""
    tree = _strip(ast.parse(source))
    return [ast.unparse(s) for s in tree.body if not isinstance(s, ast.Pass)]


@lru_cache(maxsize=None)
def _statement_digests(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    return tuple(hashlib.sha256(s.encode()).hexdigest() for s in statements(Path(path).read_text()))


def code_hash(*modules: str, nested: bool = False, root: Path | None = None) -> str:
    """Digest of the code of :func:`closure` of ``modules``: the sorted digests of every top-level
    statement of every module in it (:func:`statements`), whichever file holds it."""
    digests: list[str] = []
    for m in closure(*modules, nested=nested, root=root):
        f = module_file(m, root)
        st = f.stat()
        digests.extend(_statement_digests(str(f), st.st_mtime_ns, st.st_size))
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()
