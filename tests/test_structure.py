"""The layering rules of DESIGN.md, checked on the source: who may import what, and no import loops."""

from __future__ import annotations

import ast
import pathlib

import pytest

from rayssl.methods import available_methods

METHODS = set(available_methods())

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("rayssl", "datasets_zarr")  # datasets_zarr: the scan-to-store tools rayssl builds on


def _modules() -> dict[str, ast.Module]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _imports(tree: ast.Module, module: str) -> set[str]:
    """Every module imported anywhere in `tree` (module level and inside functions)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = module.rsplit(".", node.level)[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _unit(module: str) -> str:
    """The layer a module belongs to: rayssl.<subpackage>, a top-level rayssl module, or datasets_zarr."""
    parts = module.split(".")
    return parts[0] if parts[0] == "datasets_zarr" else ".".join(parts[:2])


MODULES = _modules()
PACKAGE_INITS = {".".join(p.relative_to(REPO).parent.parts) for pkg in PACKAGES for p in (REPO / pkg).rglob("__init__.py")}
IMPORTS = {name: _imports(tree, name) for name, tree in MODULES.items()}


def _in(layer: str) -> dict[str, set[str]]:
    return {m: i for m, i in IMPORTS.items() if m == layer or m.startswith(layer + ".")}


def test_data_never_imports_torch_nn():
    offenders = {m: sorted(i for i in imps if i == "torch.nn" or i.startswith("torch.nn."))
                 for m, imps in _in("rayssl.data").items()}
    assert not {m: v for m, v in offenders.items() if v}


def test_methods_never_import_ray():
    offenders = {m: sorted(i for i in imps if i == "ray" or i.startswith("ray."))
                 for m, imps in _in("rayssl.methods").items()}
    assert not {m: v for m, v in offenders.items() if v}


def test_nn_imports_neither_ray_nor_data_nor_methods():
    banned = ("ray", "rayssl.data", "rayssl.methods")
    offenders = {m: sorted(i for i in imps if any(i == b or i.startswith(b + ".") for b in banned))
                 for m, imps in _in("rayssl.nn").items()}
    assert not {m: v for m, v in offenders.items() if v}


def test_losses_are_pure_tensor_functions():
    """rayssl/nn/losses: each loss importable on its own, without MONAI (its transforms) or a method module."""
    offenders = {m: sorted(i for i in imps if i.split(".")[0] == "monai" or i.startswith("rayssl.methods"))
                 for m, imps in _in("rayssl.nn.losses").items()}
    assert _in("rayssl.nn.losses") and not {m: v for m, v in offenders.items() if v}


@pytest.mark.parametrize("layer", ["rayssl.eval", "rayssl.train"])
def test_eval_and_train_know_no_method_by_name(layer):
    offenders = {}
    for module in _in(layer):
        tree = MODULES[module]
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        named = sorted({node.value for node in ast.walk(tree)
                        if isinstance(node, ast.Constant) and node.value in METHODS and id(node) not in docstrings})
        imported = sorted(i for i in IMPORTS[module] if any(i.startswith(f"rayssl.methods.{name}") for name in METHODS))
        if named or imported:
            offenders[module] = named + imported
    assert not offenders, f"{layer} refers to methods by name: {offenders}"


def test_no_import_loops_between_layers():
    """Layers (rayssl subpackages and top-level modules) form a DAG, counting imports inside functions too.
    `rayssl.cli` and the package root only dispatch, so they are left out."""
    edges: dict[str, set[str]] = {}
    for module, imps in IMPORTS.items():
        source = _unit(module)
        if source in ("rayssl", "rayssl.cli"):
            continue
        for target in imps:
            if target.startswith(("rayssl.", "datasets_zarr")) and _unit(target) not in (source, "rayssl", "rayssl.cli"):
                edges.setdefault(source, set()).add(_unit(target))
    # Depth-first search for a cycle, reporting the loop found.
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state:
                loop = visit(nxt, path + [node])
                if loop:
                    return loop
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            loop = visit(start, [])
            assert loop is None, f"import loop: {' -> '.join(loop)}"


def test_the_checker_sees_lazy_imports():
    """A loop that exists only through a function-level import is still found (the rule is not vacuous)."""
    tree = ast.parse("def f():\n    from rayssl.train.trainer import pretrain\n")
    assert "rayssl.train.trainer" in _imports(tree, "rayssl.eval.x")


def test_datasets_zarr_sits_below_methods_train_eval_and_tune():
    """datasets_zarr (conversion, masks, registration, resized regions) may use rayssl.data and
    rayssl.runtime (the converter starts Ray itself), never the layers that use it."""
    banned = ("rayssl.methods", "rayssl.train", "rayssl.eval", "rayssl.tune", "rayssl.export", "rayssl.pretrained",
              "rayssl.cli", "rayssl.preview")
    offenders = {m: sorted(i for i in imps if any(i == b or i.startswith(b + ".") for b in banned))
                 for m, imps in _in("datasets_zarr").items()}
    assert not {m: v for m, v in offenders.items() if v}


def _reached(start: str) -> dict[str, str]:
    """Every rayssl / datasets_zarr module `start` imports, directly or through others (lazy imports
    included), each with the module that imports it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        module = todo.pop()
        for target in IMPORTS.get(module, ()):
            # `from pkg.mod import name`: the target is pkg.mod.name, a module or a name in pkg.mod.
            # A package's __init__ is its index of re-exports (datasets_zarr's lists the converter,
            # which starts Ray when called), not code a method calls: it is not followed.
            candidate = target if target in MODULES else target.rsplit(".", 1)[0]
            if candidate in MODULES and candidate not in PACKAGE_INITS and candidate not in seen and candidate != start:
                seen[candidate] = module
                todo.append(candidate)
    return seen


def test_methods_reach_no_code_that_starts_ray():
    """A method's preparation hands its per-volume jobs to the runner rayssl.train gives it
    (Method.prepare's `runner`), so nothing a method imports, however indirectly, imports Ray.
    rayssl.data.pipeline (Ray Data) is the data layer's Ray part: methods never import it."""
    offenders = {}
    for method in _in("rayssl.methods"):
        for module, importer in _reached(method).items():
            ray_imports = sorted(i for i in IMPORTS[module] if i == "ray" or i.startswith("ray."))
            if ray_imports:
                offenders[f"{method} -> ... {importer} -> {module}"] = ray_imports
    assert not offenders, f"methods reach code that imports Ray: {offenders}"


def test_method_modules_open_no_stores():
    """A method sees voxels only as the crops its ReadRequests return (rayssl.data reads them), so no
    method module opens a store. The one place allowed is a method package's downstream feature API
    (`rayssl.methods.<name>.features`, e.g. reading a registered volume to embed it), kept apart
    from the method that pretrains."""
    banned = ("zarr", "fsspec", "datasets_zarr.store", "datasets_zarr.manifest")
    offenders = {m: sorted(i for i in imps if any(i == b or i.startswith(b + ".") for b in banned))
                 for m, imps in _in("rayssl.methods").items() if not m.endswith(".features")}
    offenders = {m: v for m, v in offenders.items() if v}
    assert not offenders, f"method modules open stores: {offenders}"
