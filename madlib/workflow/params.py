"""Checks of a notebook's parameters, run by the notebook right after its ``parameters`` cell.

papermill only warns when it is given a parameter the notebook does not declare, so a misspelt
name (``-p dataset addition`` for ``datasets``) would silently run the defaults. The notebooks
declare their parameters as annotated literals (``datasets: list = [...]  # comment``); papermill
injects the values it is given as plain assignments in a cell headed ``# Parameters``.
:func:`check_parameters` reads both from the kernel's namespace and refuses, with one line, an
injected name the notebook does not declare and a value of the wrong type.
"""

from __future__ import annotations

import ast
import difflib
import types

INJECTED_HEADER = "# Parameters\n"
"""First line of the cell papermill injects (``papermill.translators.PythonTranslator.codify``)."""


def injected_names(history: list[str]) -> list[str]:
    """Names assigned by the last papermill-injected cell among the executed cell sources
    ``history`` (IPython's ``In``); empty when the notebook runs without papermill."""
    cells = [src for src in history if isinstance(src, str) and src.startswith(INJECTED_HEADER)]
    if not cells:
        return []
    try:
        tree = ast.parse(cells[-1])
    except SyntaxError:  # a value papermill could not render as Python: let the cell's own error speak
        return []
    return [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)]


BUILTIN_TYPES = {t.__name__: t for t in (int, float, str, bool, list, dict)}


def _annotation(annotation):
    """A string annotation ``"Union[int, str]"`` (the form papermill's parameter parser reads) as
    a tuple of builtin types; any other annotation as it is."""
    if isinstance(annotation, str) and annotation.startswith("Union[") and annotation.endswith("]"):
        names = [n.strip() for n in annotation[len("Union[") : -1].split(",")]
        if all(n in BUILTIN_TYPES for n in names):
            return tuple(BUILTIN_TYPES[n] for n in names)
    return annotation


def _accepts(annotation, value) -> bool:
    annotation = _annotation(annotation)
    if isinstance(annotation, tuple):  # Union[int, str]
        return any(_accepts(a, value) for a in annotation)
    if isinstance(annotation, types.UnionType):  # list | str
        return any(_accepts(a, value) for a in annotation.__args__)
    if not isinstance(annotation, type):
        return True  # a string or typing annotation: not checked
    if isinstance(value, bool) and annotation is not bool:
        return False
    if annotation is float:
        return isinstance(value, (int, float))
    return isinstance(value, annotation)


def check_parameters(namespace: dict, minimum: dict | None = None, positive: tuple = (), nonempty: tuple = (),
                     int_items: tuple = (), choices: dict | None = None) -> None:  # fmt: skip
    """Refuse injected parameters the notebook does not declare, and declared parameters whose
    value is not of the declared type (an int is accepted for a float). ``namespace`` is the
    notebook's ``globals()``. Then the notebook's rules on values, each refused in one line naming
    the parameter, the value and what is accepted: ``minimum`` (name -> least accepted number,
    NaN refused), ``positive`` (numbers > 0), ``nonempty`` (lists that need an item), ``int_items`` (lists of integers,
    ``True`` and ``1.5`` refused) and ``choices`` (name -> accepted values)."""
    declared = dict(namespace.get("__annotations__", {}))
    if not declared:
        raise RuntimeError("check_parameters() found no declared parameters: run the notebook's parameters cell first")
    for name in injected_names(namespace.get("In", [])):
        if name not in declared:
            close = difflib.get_close_matches(name, list(declared), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"parameter {name!r} is not declared by this notebook; {hint}accepted: {', '.join(declared)}")
    for name, annotation in declared.items():
        if name in namespace and not _accepts(annotation, namespace[name]):
            kind = " or ".join(t.__name__ for t in _annotation(annotation)) if isinstance(_annotation(annotation), tuple) \
                else getattr(annotation, "__name__", str(annotation))
            raise ValueError(f"{name}={namespace[name]!r} is not accepted; give a value of type {kind}")
    for name, least in (minimum or {}).items():
        value = namespace[name]
        if not value >= least:  # NaN fails too
            raise ValueError(f"{name}={value!r} is not accepted; give a number >= {least}")
    for name in positive:
        if not namespace[name] > 0:
            raise ValueError(f"{name}={namespace[name]!r} is not accepted; give a number > 0")
    for name in nonempty:
        if not namespace[name]:
            raise ValueError(f"{name}={namespace[name]!r} is not accepted; give at least one item")
    for name in int_items:
        values = namespace[name]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise ValueError(f"{name}={values!r} is not accepted; give a list of integers")
    for name, accepted in (choices or {}).items():
        if namespace[name] not in accepted:
            close = difflib.get_close_matches(str(namespace[name]), [str(a) for a in accepted], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{name}={namespace[name]!r} is not accepted{hint}; choose from {', '.join(map(repr, accepted))}")
