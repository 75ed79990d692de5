"""The shape of the package: subpackages by layer, each importing only from its own layer or the ones before it (counting
the imports inside functions and under TYPE_CHECKING, which are arrows too); no import circle; every module near the
~400-line guide; and the paper's image score (the best cell over all levels) computed in one function, `cells.image_scores`."""
import ast, re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / 'learn_and_search'
MAX_LINES = 450   # the guide is ~400; generated files (_modidx) are not modules of ours
# the layers in pipeline order: a module may import from its own layer and the ones before it, never a later one
LAYERS = ('utils', 'docs', 'cells', 'data', 'learn', 'evaluate', 'search', 'paper', 'app', 'bench', 'testing')
FLOOR = {'utils': 0, 'docs': 0, 'cells': 1, 'data': 2, 'learn': 3, 'evaluate': 4, 'search': 5, 'paper': 6, 'app': 7, 'bench': 8, 'testing': 9}


def modules() -> dict:
    "dotted module name under the package ('learn.loss') -> its file; package __init__ files and generated files left out"
    return {'.'.join(p.relative_to(PACKAGE).with_suffix('').parts): p for p in sorted(PACKAGE.rglob('*.py'))
            if p.stem not in ('_modidx', '__init__', '__main__')}


def _resolve(node: ast.ImportFrom, name: str) -> str | None:
    "The absolute module an ImportFrom in module `name` reads from, under the package ('learn.loss'), or None"
    if node.level == 0:
        return node.module[len('learn_and_search.'):] if (node.module or '').startswith('learn_and_search.') else (
            '' if node.module == 'learn_and_search' else None)
    base = name.split('.')[:-node.level]
    return '.'.join(base + ([node.module] if node.module else []))


def import_graph() -> dict:
    "module -> the package modules it imports anywhere in its source (top level, in functions, under TYPE_CHECKING)"
    mods, graph = modules(), {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (target := _resolve(node, name)) is not None:
                # `from pkg import mod` names modules; `from pkg.mod import f` names pkg.mod
                deps |= {f'{target}.{a.name}'.strip('.') for a in node.names if f'{target}.{a.name}'.strip('.') in mods}
                if target in mods: deps.add(target)
            elif isinstance(node, ast.Import):
                deps |= {a.name[len('learn_and_search.'):] for a in node.names if a.name.startswith('learn_and_search.')}
        graph[name] = (deps & set(mods)) - {name}
    return graph


def layer(module: str) -> str: return module.split('.')[0]


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


def test_every_module_sits_in_a_layer():
    assert set(map(layer, modules())) <= set(LAYERS), f"modules outside the layers {LAYERS}: " \
        f"{sorted(m for m in modules() if layer(m) not in LAYERS)}"


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert graph['evaluate.run'] and 'cells' in graph['learn.loss']   # the parser sees the package's imports
    assert 'data.images' in graph['learn.train']                     # `from learn_and_search.data import images` counts
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def upward_imports(graph: dict) -> list:
    "The arrows 'a -> b' of `graph` whose target sits in a later layer than their source"
    return sorted(f'{m} -> {d}' for m, deps in graph.items() for d in deps if FLOOR[layer(d)] > FLOOR[layer(m)])


def test_no_module_imports_a_later_layer():
    back = upward_imports(import_graph())
    assert not back, f"imports pointing up the layers {' < '.join(LAYERS)}: {back}"


def test_the_layer_check_can_fail():
    "A made-up upward arrow is found by the same check"
    assert upward_imports({'cells': {'learn.loss'}, 'learn.loss': {'cells'}}) == ['cells -> learn.loss']


def test_every_module_is_near_the_size_guide():
    sizes = {name: len(p.read_text().splitlines()) for name, p in modules().items()}
    too_long = {n: s for n, s in sizes.items() if s > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concern): {too_long}"


def test_the_image_score_is_computed_in_one_function():
    "A max over cells of query-cell similarities (an einsum, a matrix product, `sim`s) is in `cells.image_scores` only"
    pattern = re.compile(r"\.(amax|max)\((-1|1)\)")
    similarity = re.compile(r"einsum\(| @ |\bsims?\b")
    found = {name: sum(bool(pattern.search(line) and similarity.search(line)) for line in p.read_text().splitlines())
             for name, p in modules().items()}
    assert found['cells'] >= 1, 'the pattern no longer matches cells.image_scores itself: update this test'
    # evaluate.metrics.best_cells is SGA's argmax over a query's own scene maps: where the object is, not how an image ranks
    others = {n: k for n, k in found.items() if k and n != 'cells' and not (n == 'evaluate.metrics' and k == 1)}
    assert not others, f"max over cells outside cells.image_scores: {others}"
