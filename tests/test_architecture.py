"""The package's shape: layer order of ../shared/DESIGN.md (updated in the docstring of LAYERS), no
import cycle, no module over 400 lines, one place for the launcher environment, the uint8
formula, the sampling loop and the FD/precision-recall computation."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sims"

# Layer of each top-level part (a module imports only its own layer or lower ones). 0: foundations;
# 1 diffusion; 2 networks; 3 data (and the toy models' mathematics); 4 training; 5 generation and
# figures; 6 metrics; 7 stages; 8 loop; 9 cli; 10 the public API (sims/__init__, sims/_api).
LAYERS = {
    "sims.errors": 0, "sims.utils": 0, "sims.config": 0, "sims.dist": 0,
    "sims.diffusion": 1, "sims.networks": 2, "sims.data": 3, "sims.toy": 3, "sims.training": 4,
    "sims.generation": 5, "sims.figures": 5, "sims.metrics": 6, "sims.stages": 7, "sims.loop": 8, "sims.cli": 9,
    "sims": 10, "sims._api": 10,
}


def modules() -> Dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def layer_of(name: str) -> int:
    while name not in LAYERS:
        name = name.rpartition(".")[0]
    return LAYERS[name]


def imports_of(path: Path, known: Set[str]) -> List[str]:
    """Every sims module imported by ``path``, at module level or inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n.startswith("sims"):
                out.append(n)
    return sorted(set(out))


def test_every_module_has_a_layer_and_imports_only_downward():
    mods = modules()
    bad = []
    for name, path in mods.items():
        for dep in imports_of(path, set(mods)):
            if dep != name and layer_of(dep) > layer_of(name):
                bad.append(f"{name} (layer {layer_of(name)}) imports {dep} (layer {layer_of(dep)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    mods = modules()
    graph = {n: [d for d in imports_of(p, set(mods)) if d != n and not n.startswith(d + ".")] for n, p in mods.items()}
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in graph.get(n, []):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def _code_files():
    return [p for p in PKG.rglob("*.py")]


def test_only_dist_reads_the_launchers_environment_or_asks_torch_distributed():
    offenders = []
    for p in _code_files():
        if p.name == "dist.py" and p.parent == PKG:
            continue
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                v = node.value
                if v in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK") \
                        or v.startswith("SLURM_"):
                    offenders.append(f"{p.relative_to(ROOT)}:{node.lineno} {v!r}")
            if isinstance(node, ast.Attribute) and node.attr in ("get_rank", "get_world_size", "is_initialized"):
                offenders.append(f"{p.relative_to(ROOT)}:{node.lineno} .{node.attr}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.startswith("torch.distributed") for n in names):
                    offenders.append(f"{p.relative_to(ROOT)}:{node.lineno} imports torch.distributed")
            if isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name) \
                    and node.value.id == "torch":
                offenders.append(f"{p.relative_to(ROOT)}:{node.lineno} torch.distributed")
    assert not offenders, "\n".join(offenders)


def _calls(name: str) -> Set[str]:
    """``file:function`` of every call to ``name`` in the package."""
    where = set()
    for p in _code_files():
        tree = ast.parse(p.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.Call):
                        f = node.func
                        called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                        if called == name:
                            where.add(f"{p.relative_to(PKG)}:{fn.name}")
    return where


def test_the_uint8_formula_lives_in_one_function_pair():
    found = []
    for p in _code_files():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Constant) and node.value == 127.5:
                found.append(str(p.relative_to(PKG)))
    assert set(found) == {"data/images.py"}, sorted(set(found))


def test_one_sampling_loop():
    assert _calls("seed_batches") == {"generation.py:rank_batches"}
    assert _calls("sample_batch") == {"generation.py:generate"}
    assert _calls("edm_sampler") == {"generation.py:sample_batch"}


def test_fd_and_precision_recall_from_one_stage_function():
    assert _calls("precision_recall") == {"stages/evaluate.py:evaluate_samples"}
    assert _calls("frechet_distance") <= {"stages/evaluate.py:evaluate_samples", "stages/evaluate.py:resample_floor"}
