"""The project's import graph: `fellrec_flwr` never imports the apps, reaches `data_prep` through
one door only, no folder of the project (packages, bench/, deploy/, tests/) has an import cycle,
and the map in docs/architecture.md is the one the code draws.

Walks the source with `ast` (nothing is imported), counting module-level AND function-level
imports: a lazy import inside a function still makes the two modules depend on each other.

`python tests/test_imports.py` prints the map (rooms and their arrows) for docs/architecture.md.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "fellrec_flwr"
APP_PACKAGES = ("client_app", "server_app", "strategies")
DATA_PREP = "data_prep"
# The library's one arrow to data_prep (why it must stay: that module's docstring, docs/architecture.md).
DATA_PREP_DOOR = "fellrec_flwr.data.on_demand"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_names(path: Path) -> set[str]:
    """Absolute module names `path` imports (relative imports resolved)."""
    return set(_imported_names(path, path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=None)  # several tests walk the same ~150 files
def _imported_names(path: Path, _mtime_ns: int) -> frozenset[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return frozenset(names)


# Imports that close a cycle in files other people are editing right now: each is one lazy import
# of a helper. Fix it (e.g. `speed` can take `cache_root` from `fellrec_flwr.paths`), then delete
# the entry; `test_pending_edges_still_exist` fails once an entry is stale.
PENDING_EDGES: dict[tuple[str, str], str] = {}  # (importer, imported) -> the planned fix


def project_folders() -> list[str]:
    """Every top-level folder holding Python source (packages and script folders alike)."""
    return sorted(p.name for p in ROOT.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and any(p.rglob("*.py")))


def project_graph(folders: list[str] | None = None) -> dict[str, set[str]]:
    """module -> the project modules it imports (names that are not project modules are dropped).

    A script folder without __init__.py (bench/, tests/) puts itself on sys.path, so a bare
    `import games_retrieval` there is its sibling `bench.games_retrieval`. An import of one of
    the module's own enclosing packages (`from . import x` adds the package) is not an edge: that
    package is already being imported when the module runs.
    """
    files = sorted(f for folder in (folders or project_folders()) for f in (ROOT / folder).rglob("*.py"))
    modules = {module_name(f): f for f in files}
    graph = {}
    for name, path in modules.items():
        scripts = "" if (path.parent / "__init__.py").exists() else module_name(path.parent) + "."
        enclosing = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        deps = set()
        for imported in imported_names(path):
            for candidate in (imported, scripts + imported if scripts else None):
                if candidate in modules and candidate != name and candidate not in enclosing:
                    deps.add(candidate)
        graph[name] = deps
    return graph


def library_graph() -> dict[str, set[str]]:
    """module -> the library modules it imports."""
    return project_graph([LIBRARY])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colours)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_library_never_imports_the_apps():
    offenders = []
    for path in sorted((ROOT / LIBRARY).rglob("*.py")):
        for name in sorted(imported_names(path)):
            if name.split(".")[0] in APP_PACKAGES:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, ("the library must not import the apps (move what it needs into fellrec_flwr/): "
                           + "; ".join(offenders))


def test_library_reaches_data_prep_only_through_its_door():
    """The library reads prepared folders; preparing them (and reading raw sources) is data_prep's
    job, asked for in one place only."""
    offenders = []
    for path in sorted((ROOT / LIBRARY).rglob("*.py")):
        if module_name(path) == DATA_PREP_DOOR:
            continue
        offenders += [f"{path.relative_to(ROOT)} imports {name}" for name in sorted(imported_names(path))
                      if name.split(".")[0] == DATA_PREP]
    assert not offenders, (f"the library imports data_prep only in {DATA_PREP_DOOR} (add a function there): "
                           + "; ".join(offenders))
    assert any(n.startswith(DATA_PREP + ".") for n in imported_names(ROOT / (DATA_PREP_DOOR.replace(".", "/") + ".py")))


def test_project_has_no_import_cycle():
    graph = project_graph()
    for src, dst in PENDING_EDGES:
        graph.get(src, set()).discard(dst)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_project_graph_covers_every_package():
    """Guard against a walker that silently skips a folder (the old one saw only fellrec_flwr/)."""
    graph = project_graph()
    folders = {name.split(".")[0] for name in graph}
    assert {LIBRARY, DATA_PREP, *APP_PACKAGES, "bench", "tests"} <= folders, folders
    assert "data_prep.kmeans" in graph["data_prep.partitioners"]  # a package's own import
    assert "bench.games_retrieval" in graph["bench.games_federated"]  # a script's bare sibling import
    assert "strategies.base" in graph["strategies.fellrec"]  # a relative import


def test_pending_edges_still_exist():
    graph = project_graph()
    stale = [f"{a} -> {b}" for a, b in PENDING_EDGES if b not in graph.get(a, set())]
    assert not stale, f"fixed, so remove from PENDING_EDGES: {stale}"


def test_the_walker_finds_what_it_should():
    """The checks above can fail: a cycle and an app import are found in a made-up graph/file."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    fake = ROOT / LIBRARY / "_walker_probe.py"
    try:
        fake.write_text("def f():\n    from server_app.split_service import x\nfrom . import split\n")
        names = imported_names(fake)
    finally:
        fake.unlink()
    assert "server_app.split_service" in names and "fellrec_flwr.split" in names


@pytest.mark.parametrize("package", APP_PACKAGES)
def test_app_packages_exist(package):
    """Guard against a rename that would make the first test vacuous."""
    assert (ROOT / package).is_dir()


# --------------------------------------------------------------------------- the map in docs/architecture.md
MAP_PACKAGES = (LIBRARY, DATA_PREP, *APP_PACKAGES)  # bench/, deploy/ and tests/ stand above all of them
MAP_BEGIN, MAP_END = "<!-- import map: begin (python tests/test_imports.py) -->", "<!-- import map: end -->"


def room_of(module: str) -> str:
    """A map room: a sub-package or top-level module of the library (named without "fellrec_flwr/"),
    or a whole other package."""
    parts = module.split(".")
    if parts[0] != LIBRARY or len(parts) == 1:
        return parts[0] + "/"
    return f"{parts[1]}/" if (ROOT / LIBRARY / parts[1]).is_dir() else f"{parts[1]}.py"


def room_graph() -> dict[str, dict[str, set[tuple[str, str]]]]:
    """room -> {room it imports: the (module, module) arrows behind it}."""
    rooms: dict[str, dict[str, set[tuple[str, str]]]] = {}
    for module, deps in project_graph(list(MAP_PACKAGES)).items():
        if module == LIBRARY:  # the package's empty __init__
            continue
        here = rooms.setdefault(room_of(module), {})
        for dep in deps:
            if room_of(dep) != room_of(module):
                here.setdefault(room_of(dep), set()).add((module, dep))
    return rooms


def render_map() -> str:
    """The rooms with what each imports, then every pair of rooms that import each other (with
    the module arrows behind the pair: no module cycle, but a reader should know)."""
    rooms = room_graph()
    width = max(len(r) for r in rooms) + 2
    lines = ["```", f"{'room':{width}}imports   (library rooms without their fellrec_flwr/ prefix)"]
    for room in sorted(rooms):
        lines.append(f"{room:{width}}{', '.join(sorted(rooms[room])) or '-'}".rstrip())
    lines.append("```")
    pairs = sorted((a, b) for a in rooms for b in rooms[a] if a < b and a in rooms.get(b, {}))
    if pairs:
        lines += ["", "Rooms that import each other (module by module there is no cycle):"]
        for a, b in pairs:
            arrows = sorted(rooms[a][b] | rooms[b][a])
            lines.append(f"- `{a}` and `{b}`: " + "; ".join(f"{x} -> {y}" for x, y in arrows))
    return "\n".join(lines)


def test_architecture_map_is_the_one_the_code_draws():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert MAP_BEGIN in doc and MAP_END in doc, f"docs/architecture.md lost its map markers {MAP_BEGIN!r}"
    drawn = doc.split(MAP_BEGIN, 1)[1].split(MAP_END, 1)[0].strip()
    assert drawn == render_map(), ("docs/architecture.md's import map is stale: replace the block between its "
                                   "markers with the output of `python tests/test_imports.py`.")


STALE_MODULE_NAMES = re.compile(r"\b(split_client|model_parts|split_runtime)\.")  # before the rooms by role


def test_no_stale_module_names_in_docs_and_code():
    offenders = []
    for path in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md",
                 *sorted(p for folder in MAP_PACKAGES for p in (ROOT / folder).rglob("*.py"))]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if STALE_MODULE_NAMES.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, ("old module names (split_client. -> fellrec_flwr.split.client., model_parts. -> "
                           "fellrec_flwr.model.parts., split_runtime. -> fellrec_flwr.split.runtime.): "
                           + ", ".join(offenders))


if __name__ == "__main__":
    print(MAP_BEGIN)
    print(render_map())
    print(MAP_END)
