"""The package layout reads like the workflow (docs/design.md §7): every import points from a
later step to an earlier one."""

import ast
import pathlib

import baim_jax

ROOT = pathlib.Path(baim_jax.__file__).parent


def _imports() -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports, also inside functions.

    ``from P import m`` imports the module ``P.m`` when there is one, else a name of ``P``.
    """
    paths = {".".join(("baim_jax", *p.relative_to(ROOT).with_suffix("").parts)
                      ).removesuffix(".__init__"): p for p in ROOT.rglob("*.py")}
    deps = {}
    for name, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("baim_jax"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if sub in paths else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("baim_jax")}
        deps[name] = found & set(paths)
    return deps


def _reachable(deps: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in deps[todo.pop()] - seen:
            seen.add(d)
            todo.append(d)
    return seen


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_each_step_reaches_only_earlier_steps():
    deps = _imports()
    assert len(deps) > 30 and "baim_jax.core.baim" in deps
    later = {"core": {"checkpoint", "framework", "evaluation", "service", "cli", "train"},
             "framework": {"service", "cli", "train"},
             "service": {"framework", "cli", "train"}}
    for module in deps:
        banned = later.get(_part(module), set())
        bad = sorted(d for d in _reachable(deps, module) if _part(d) in banned)
        assert not bad, f"{module} reaches {bad}"


def test_the_package_has_no_import_cycle():
    """No module reaches itself through the imports it makes (inside functions too)."""
    deps = _imports()
    cyclic = sorted(m for m in deps if m in _reachable(deps, m))
    assert not cyclic, f"import cycles through {cyclic}"
