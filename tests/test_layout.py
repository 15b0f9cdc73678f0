"""The package layout's rules, read from the source (every import statement, lazy ones too):
imports flow one way between subpackages, no two modules import each other (directly or
round about), the engine and the kernels never import Ray, the records and the step-cost model
import nothing heavy, no module passes 380 lines and no function 60 (Triton kernels aside), and
one module writes a request's life into the replica book."""
import ast
from pathlib import Path

KVRAY = Path(__file__).resolve().parents[1] / "kvray"
MAX_LINES = 380
MAX_FUNCTION_LINES = 60  # a Triton kernel (@triton.jit) is one launch: it may be longer
# The replica book's request-life events and the one module that writes them (RequestLife); the
# book itself forwards them to its replica states.
BOOK_WRITERS = {"on_dispatch", "on_first_token", "on_finish"}
BOOK_WRITER_MODULE = "kvray.router.dispatch"
BOOK_MODULES = {"kvray.router.book", "kvray.router.replica_state"}
# Each subpackage (or leaf module) and the kvray parts it may import, besides itself.
LAYERS = {
    "records": {"slo"}, "slo": set(), "step_cost": {"records"}, "gil": set(), "tracing": set(), "metrics": set(),
    "kernels": set(),
    "replica": {"records", "slo", "step_cost", "kernels", "tracing", "gil"},
    "router": {"records", "slo", "step_cost", "replica", "tracing"},
    "app_config": {"replica", "router", "slo"},
    "frontend": {"records", "slo", "replica", "router", "app_config", "tracing", "gil", "metrics"},
    "platform": {"records", "slo", "step_cost", "replica", "router", "frontend", "app_config", "tracing", "gil",
                 "metrics"},
    "cli": {"app_config", "replica", "platform"},
    "__init__": {"replica"},
}


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(KVRAY.parent).with_suffix("").parts): p for p in KVRAY.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """kvray modules imported anywhere in the file (``from kvray.x import y`` counts x.y when it
    is a module)."""
    mods = modules()
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("kvray")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvray") and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in mods or f"{sub}.__init__" in mods else node.module)
    return out


def part(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else module


def test_imports_flow_one_way_between_subpackages():
    bad = []
    for mod, path in modules().items():
        src = part(mod)
        for dep in imports(path):
            tgt = part(dep) if dep != "kvray" else "__init__"
            if tgt != src and tgt not in LAYERS[src]:
                bad.append(f"{mod} imports {dep}")
    assert not bad, bad


def test_no_import_cycle_between_modules():
    mods = modules()
    graph = {m: {d if d in mods else f"{d}.__init__" for d in imports(p)} - {m} for m, p in mods.items()}
    graph = {m: {d for d in deps if d in mods and not d.endswith("__init__")} for m, deps in graph.items()}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in graph.get(m, ()):
            visit(d)
        stack.pop()

    for m in graph:
        visit(m)
    assert not cycles, cycles


def test_engine_kernels_and_policies_are_ray_free_and_records_are_light():
    heavy = {"ray": lambda m: part(m) in ("replica", "kernels", "records", "slo", "step_cost", "app_config")
             or (part(m) == "router" and not m.endswith("serve_router")),
             "torch": lambda m: part(m) in ("records", "slo", "step_cost", "router", "frontend", "app_config", "metrics")
             # the serving replica's process imports it (through engine_process) and must not load torch
             or m == "kvray.replica.parallel.lifecycle"}
    bad = []
    for mod, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for n in names:
                root = n.split(".")[0]
                if root in heavy and heavy[root](mod):
                    bad.append(f"{mod} imports {n}")
    assert not bad, bad


def test_no_module_is_too_long():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def _is_triton_kernel(fn: ast.FunctionDef) -> bool:
    for d in fn.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if ast.unparse(target) in ("triton.jit", "jit"):
            return True
    return False


def test_no_function_is_too_long():
    long = {}
    for mod, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{mod}.{node.name}"] = n
    assert not long, long


def test_one_module_writes_a_requests_life_into_the_replica_book():
    """Calls of the book's dispatch, first-token and finish events come from RequestLife's module
    only (the Serve plug-in, the frontend, the metrics never write them)."""
    callers = {}
    for mod, path in modules().items():
        if mod in BOOK_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in BOOK_WRITERS:
                callers.setdefault(mod, []).append(f"{node.func.attr}:{node.lineno}")
    assert set(callers) <= {BOOK_WRITER_MODULE}, callers
    assert callers.get(BOOK_WRITER_MODULE), "RequestLife writes the book's events"
