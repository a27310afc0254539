"""The core is engine-neutral: the modules that hold pages, slots and the host pool, selection, the ops and
the kernels never import transformers, directly or through our other modules. Only the HF adapter
(cache.py, layer.py, graphs.py, compat.py and the CLI/eval around them) knows transformers."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"flexicache_hf": ROOT / "flexicache_hf", "flexicache_hf.kernels": ROOT / "kernels"}
CORE = ["flexicache_hf.memory", "flexicache_hf.memory.layer", "flexicache_hf.memory.offload", "flexicache_hf.memory.gpu_pages",
        "flexicache_hf.memory.metadata", "flexicache_hf.memory.alloc", "flexicache_hf.decode", "flexicache_hf.scorers", "flexicache_hf.ops",
        "flexicache_hf.config", "flexicache_hf.calibration", "flexicache_hf.stability", "flexicache_hf.profiles",
        "flexicache_hf.kernels"]


def _source(module: str) -> pathlib.Path | None:
    for pkg, folder in sorted(PACKAGES.items(), key=lambda kv: -len(kv[0])):
        if module == pkg or module.startswith(pkg + "."):
            rel = module[len(pkg):].lstrip(".").replace(".", "/")
            base = folder / rel if rel else folder
            for path in (base.with_suffix(".py"), base / "__init__.py"):
                if path.exists():
                    return path
    return None


def _imports(module: str) -> set[str]:
    """Every module `module`'s source imports (top level or inside functions), absolute names."""
    path = _source(module)
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names if _source(f"{base}.{a.name}")}
            # `from package import submodule` runs the package's __init__ too; for flexicache_hf that is the
            # registration with transformers, which every entry point pays: the edge that counts is the submodule
            if len(subs) < len(node.names) or base != "flexicache_hf":
                found.add(base)
            found |= subs
    return found


def _closure(module: str) -> dict[str, str]:
    """Every module reachable from `module` through our own imports -> the module that imported it."""
    seen, todo = {module: ""}, [module]
    while todo:
        m = todo.pop()
        for dep in _imports(m):
            if dep in seen:
                continue
            if _source(dep) is not None or dep.split(".")[0] not in ("flexicache_hf",):
                seen[dep] = m
                if _source(dep) is not None:
                    todo.append(dep)
    return seen


@pytest.mark.parametrize("module", CORE)
def test_core_does_not_import_transformers(module):
    reached = _closure(module)
    bad = sorted(m for m in reached if m.split(".")[0] == "transformers")
    chains = []
    for m in bad:
        chain, step = [m], reached[m]
        while step:
            chain.append(step)
            step = reached[step]
        chains.append(" <- ".join(chain))
    assert not bad, "transformers reached from the core: " + "; ".join(chains)


def test_the_walk_sees_the_adapter_import_transformers():
    """The walk itself works: the HF adapter does reach transformers."""
    assert any(m.startswith("transformers") for m in _closure("flexicache_hf.layer"))


def test_classes_and_functions_stay_small():
    """Readable in one sitting: no class over 250 lines, no function over 60, the layer class under 200."""
    too_long = []
    for path in sorted((ROOT / "flexicache_hf").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            limit = {ast.ClassDef: 200 if getattr(node, "name", "") == "FlexiCacheLayer" else 250,
                     ast.FunctionDef: 60}.get(type(node))
            if limit and size > limit:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({size} lines > {limit})")
    assert not too_long, too_long


def test_every_package_folder_is_installed():
    """A wheel installs only the packages pyproject.toml lists: every folder of flexicache_hf/ with an
    __init__.py must be there (an editable install would hide a missing one)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"flexicache_hf" + "".join("." + p for p in init.parent.relative_to(ROOT / "flexicache_hf").parts)
               for init in (ROOT / "flexicache_hf").rglob("__init__.py")}
    assert folders <= listed, sorted(folders - listed)
