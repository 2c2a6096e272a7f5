"""Sphinx fixes of the book's HTML pages.

Jupyter Book 1 registers sphinx-thebe's configuration script twice, and a page that declares
``const THEBE_JS_URL`` twice throws a SyntaxError in the browser; every page's scripts are
therefore included once each (the first of identical entries kept, the order otherwise kept).

The theme's colour mode defaults to "" under Jupyter Book 1, and every reader's first page logs
"Got invalid theme mode" as a console error; it defaults to "auto" (the reader's system setting).
"""


def unique_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        # file name (an inline script has None or "", depending on who added it) and attributes
        # (an inline script's body among them)
        key = (getattr(js, "filename", js) or "", tuple(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def default_mode(app, config) -> None:
    """pydata-sphinx-theme 0.17 reads the mode from the template context's ``default_mode``."""
    context = dict(config.html_context or {})
    context.setdefault("default_mode", "auto")
    config.html_context = context


def setup(app):
    app.connect("config-inited", default_mode)
    app.connect("html-page-context", unique_scripts, priority=100)  # before any handler that returns a template (emit_firstresult stops there)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
