"""The shape of the package: its import graph has no circle (counting the imports inside functions and under
TYPE_CHECKING, which are arrows too), every module stays near the ~400-line guide, and the paper's image score (the
best cell over all levels) is computed in one function, `grid.image_scores`."""
import ast, re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / 'learn_and_search'
MAX_LINES = 450   # the guide is ~400; generated files (_modidx) are not modules of ours


def modules() -> dict:
    return {p.stem: p for p in PACKAGE.glob('*.py') if p.stem not in ('_modidx', '__init__')}


def import_graph() -> dict:
    "module -> the package modules it imports anywhere in its source (top level, in functions, under TYPE_CHECKING)"
    mods, graph = modules(), {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split('.')
                target = parts[0] if node.level == 1 else parts[1] if parts[0] == 'learn_and_search' and len(parts) > 1 else None
                if target is None and node.module == 'learn_and_search': deps |= {a.name for a in node.names}
                elif target: deps.add(target)
            elif isinstance(node, ast.Import):
                deps |= {a.name.split('.')[1] for a in node.names if a.name.startswith('learn_and_search.')}
        graph[name] = (deps & set(mods)) - {name}
    return graph


def find_cycle(graph: dict) -> list | None:
    "One import circle as [a, b, ..., a], or None"
    state, path = {}, []
    def visit(u):
        state[u] = 'open'; path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 'open': return path[path.index(v):] + [v]
            if v not in state and (found := visit(v)): return found
        path.pop(); state[u] = 'done'
    for u in sorted(graph):
        if u not in state and (found := visit(u)): return found


def test_find_cycle_finds_one():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert graph['evaluate'] and 'grid' in graph['loss']   # the parser sees the package's imports
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_every_module_is_near_the_size_guide():
    sizes = {name: len(p.read_text().splitlines()) for name, p in modules().items()}
    too_long = {n: s for n, s in sizes.items() if s > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concern): {too_long}"


def test_the_image_score_is_computed_in_one_function():
    "A max over cells of query-cell similarities (an einsum, a matrix product, `sim`s) is in `grid.image_scores` only"
    pattern = re.compile(r"\.(amax|max)\((-1|1)\)")
    similarity = re.compile(r"einsum\(| @ |\bsims?\b")
    found = {name: sum(bool(pattern.search(line) and similarity.search(line)) for line in p.read_text().splitlines())
             for name, p in modules().items()}
    assert found['grid'] >= 1, 'the pattern no longer matches grid.image_scores itself: update this test'
    # metrics.best_cells is SGA's argmax over a query's own scene maps: where the object is, not how an image ranks
    others = {n: k for n, k in found.items() if k and n != 'grid' and not (n == 'metrics' and k == 1)}
    assert not others, f"max over cells outside grid.image_scores: {others}"
