"""DESIGN invariant 6: nothing persisted is ever unpickled, so the package never imports pickle-like modules."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import promptcache

FORBIDDEN = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PACKAGE = Path(promptcache.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            names.update(
                a.value
                for a in node.args
                if isinstance(a, ast.Constant) and isinstance(a.value, str)
            )
    return names


def test_no_module_of_the_package_imports_pickle():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    offenders = {str(f.relative_to(PACKAGE)): imported_modules(f) & FORBIDDEN for f in files}
    assert {f: m for f, m in offenders.items() if m} == {}


def test_a_disk_round_trip_never_calls_pickle(tmp_path):
    """Persist and read back through every persisted path with pickle's loaders booby-trapped."""
    script = textwrap.dedent(
        f"""
        import pickle
        def trap(*a, **k):
            raise AssertionError("pickle used")
        pickle.load = pickle.loads = pickle.Unpickler = trap
        from promptcache import PromptCache, FixedWidthCodec
        from promptcache.store.disk import DiskStore
        cache = PromptCache(DiskStore({str(tmp_path)!r}), codec=FixedWidthCodec(4))
        cache.insert(list(range(40)), bytes(range(160)), "fp")
        fresh = PromptCache(DiskStore({str(tmp_path)!r}), codec=FixedWidthCodec(4))
        hit = fresh.lookup(list(range(40)) + [7], "fp")
        assert hit.tokens_reused == 40 and hit.state == bytes(range(160)), hit
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
