"""Digests of the code a cached artefact depends on: a module's import closure within ``madlib``.

A cache key that hashes a hand-written list of file names breaks when a file moves and misses
code added to a module it did not list. :func:`code_hash` instead follows the module's
``madlib`` imports at module level (``from . import data``, ``from .zoo import pad_batch``,
``import madlib.x``), recursively, and hashes the sources it reaches. Imports written inside a
function are not followed: the package uses them to break cycles towards a module's callers
(``zoo.get_model`` imports ``quirky``, which imports ``zoo``), not for the code a training or
extraction runs. The digest is over the sources' contents, sorted, so renaming or moving a
module without changing any source keeps it.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "madlib"
ROOT = Path(__file__).parent


def module_file(module: str) -> Path | None:
    """The source file of ``madlib.<...>`` (a module or a package's ``__init__``), or ``None``."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = ROOT.joinpath(*parts[1:])
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """The ``madlib`` modules an ``ImportFrom`` at module level of ``module`` names."""
    if node.level:
        package = module.split(".")
        if module_file(module) is not None and module_file(module).name != "__init__.py":
            package = package[:-1]
        package = package[: len(package) - (node.level - 1)]
        target = ".".join(package + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    out = [target] if module_file(target) else []
    out += [f"{target}.{a.name}" for a in node.names if module_file(f"{target}.{a.name}")]  # from . import data
    return out


def imports(module: str) -> list[str]:
    """The ``madlib`` modules ``module`` imports at module level."""
    path = module_file(module)
    if path is None:
        raise ValueError(f"module={module!r} is not accepted; give a module of the {PACKAGE} package, e.g. 'madlib.quirky'")
    out: list[str] = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            out += _resolve(module, node)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if module_file(a.name)]
    return sorted(set(out))


def closure(*modules: str) -> list[str]:
    """``modules`` and every ``madlib`` module they reach through module-level imports."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(imports(m))
    return sorted(seen)


@lru_cache(maxsize=None)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def code_hash(*modules: str) -> str:
    """Digest of the sources of :func:`closure` of ``modules`` (contents only, sorted)."""
    digests = []
    for m in closure(*modules):
        f = module_file(m)
        st = f.stat()
        digests.append(_file_digest(str(f), st.st_mtime_ns, st.st_size))
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()
