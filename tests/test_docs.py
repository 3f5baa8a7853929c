"""The documentation cannot rot: its code runs, and every public name has a docstring.

- The Python code blocks of ``docs/getting_started.rst`` run, in order, in one namespace, and
  the model they train reaches the accuracy the page states.
- The Python example of ``README.md`` runs as written.
- Every public name of every public module of the package has a non-empty docstring, and every
  public module has a page in the API reference.
"""
import importlib
import importlib.util
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import optcore

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Modules that are not part of the Python API: the command-line entry point (documented on
# the getting-started and performance pages as the ``optcore`` command).
NOT_API = {"optcore.cli"}


def rst_python_blocks(text):
    """Return the bodies of the ``.. code-block:: python`` directives of a reST text."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if re.match(r"\s*\.\. code-block:: python\s*$", lines[i]):
            indent = len(lines[i]) - len(lines[i].lstrip()) + 1
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or
                                      len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i])
                i += 1
            blocks.append(inspect.cleandoc("\n".join(body)))
        else:
            i += 1
    return blocks


def markdown_python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_rst_block_extraction():
    text = "Intro\n\n.. code-block:: python\n\n   a = 1\n\n   b = a + 1\n\nAfter.\n"
    assert rst_python_blocks(text) == ["a = 1\n\nb = a + 1"]


def test_getting_started_runs(capsys):
    blocks = rst_python_blocks((DOCS / "getting_started.rst").read_text())
    assert len(blocks) >= 5
    namespace = {"__name__": "getting_started"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"getting_started.rst block {i}", "exec"), namespace)
    # The page states that the example reaches a test accuracy above 0.9.
    assert namespace["test_accuracy"] > 0.9
    assert "test accuracy" in capsys.readouterr().out


def test_readme_example_runs(capsys):
    blocks = markdown_python_blocks((ROOT / "README.md").read_text())
    assert blocks, "README.md has no ```python example"
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md block {i}", "exec"), {"__name__": "readme"})


def public_module_names():
    """optcore and the names of its public submodules (no leading underscore), those of public
    subpackages included (found without importing them: optcore.torch needs torch)."""
    names = ["optcore"]

    def walk(prefix, path):
        for m in pkgutil.iter_modules(path):
            full = f"{prefix}.{m.name}"
            if m.name.startswith("_") or full in NOT_API:
                continue
            names.append(full)
            if m.ispkg:
                walk(full, importlib.util.find_spec(full).submodule_search_locations)

    walk("optcore", optcore.__path__)
    return names


def import_public(name):
    """Import a public module; None when it needs an optional dependency that is absent (a
    missing optcore module is an error)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if exc.name is None or exc.name.split(".")[0] == "optcore":
            raise
        return None


def module_params():
    params = []
    for name in public_module_names():
        module = import_public(name)
        if module is None:
            params.append(pytest.param(None, id=name, marks=pytest.mark.skip(
                reason=f"{name} needs an optional dependency that is not installed")))
        else:
            params.append(pytest.param(module, id=name))
    return params


def public_names(module):
    """The module's ``__all__``, else the functions and classes it defines without a leading
    underscore."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [n for n, obj in vars(module).items()
            if not n.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
            and getattr(obj, "__module__", None) == module.__name__]


def undocumented(module):
    """Dotted names of the public objects of ``module`` (and of the public methods and
    properties of its public classes) whose docstring is missing or empty."""
    missing = []
    if not (module.__doc__ or "").strip():
        missing.append(module.__name__)
    for name in public_names(module):
        obj = getattr(module, name)
        if not (inspect.getdoc(obj) or "").strip():
            missing.append(f"{module.__name__}.{name}")
        if inspect.isclass(obj) and obj.__module__.startswith("optcore"):
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if (inspect.isfunction(member) or isinstance(member, property)) and not (
                        inspect.getdoc(member) or "").strip():
                    missing.append(f"{module.__name__}.{name}.{attr}")
    return missing


@pytest.mark.parametrize("module", module_params())
def test_public_names_have_docstrings(module):
    assert undocumented(module) == []


def test_every_public_kernel_is_in_all():
    """Every public function of optcore.kernels is in its __all__ (so the API page and the
    docstring test see it)."""
    defined = {n for n, obj in vars(optcore.kernels).items()
               if not n.startswith("_") and inspect.isfunction(obj)
               and obj.__module__ == "optcore.kernels"}
    assert defined <= set(optcore.kernels.__all__)


def test_every_public_module_has_an_api_page():
    pages = {p.stem for p in (DOCS / "api").glob("*.rst")}
    modules = set(public_module_names())
    assert modules <= pages, f"add docs/api/<module>.rst for {sorted(modules - pages)}"


def test_every_api_page_documents_a_module():
    """docs/conf.py leaves out the page of a module the package does not contain; once every
    feature is merged, no page may be left out (a renamed module would leave a stale page)."""
    modules = set(public_module_names())
    stale = sorted(p.stem for p in (DOCS / "api").glob("*.rst") if p.stem not in modules)
    assert stale == [], f"docs/api pages without a module: {stale}"
