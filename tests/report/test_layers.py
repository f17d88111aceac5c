"""The package's three layers import in one direction only: engine <- bench <- report, with no import circles."""
import ast
from pathlib import Path

import llmopt

PACKAGE = Path(llmopt.__file__).parent
LAYERS = ("engine", "bench", "report")
ALLOWED = {"engine": {"engine"}, "bench": {"engine", "bench"}, "report": {"engine", "bench", "report"}}
ENGINE_FORBIDDEN = {"pandas", "tqdm", "matplotlib", "seaborn", "papermill", "nbformat", "nbconvert"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Fully qualified modules `path` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def own_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_layers_import_downward_only():
    modules = own_modules()
    wrong = []
    for name, path in modules.items():
        parts = name.split(".")
        layer = parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None
        for target in imports(path):
            tparts = target.split(".")
            if tparts[0] in ENGINE_FORBIDDEN and layer == "engine":
                wrong.append(f"{name} imports {target}")
            if tparts[0] != "llmopt" or len(tparts) < 2:
                continue
            if layer is None and tparts[1] in LAYERS and name not in ("llmopt", "llmopt.cli"):
                wrong.append(f"{name} (shared base) imports {target}")
            if layer and tparts[1] in LAYERS and tparts[1] not in ALLOWED[layer]:
                wrong.append(f"{name} ({layer}) imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    modules = own_modules()
    graph = {name: {t for t in imports(path) if t in modules and t != name} for name, path in modules.items()}
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles
