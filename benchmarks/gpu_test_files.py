"""Which test files device_check.sh gives pytest on the GPU machine.

A file qualifies if it has `gpu` tests (`@pytest.mark.gpu`, or `pytestmark` naming it) and
importing it needs none of the packages absent there (pydantic, vLLM, Ray, DeepSpeed): pytest
imports every file it is given, and one failed import is a collection error. The imports are
followed statically through this repository's own modules (sere.*, the test helpers beside the
tests), module-level statements only: an import inside a function or under `if TYPE_CHECKING:` is
not run at collection.

    python3 benchmarks/gpu_test_files.py [--root REPO]
prints the qualifying files, one per line; on stderr, each file left out with the chain of
imports that reaches an absent package. Standard library only.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ABSENT_THERE = ("pydantic", "vllm", "ray", "deepspeed")


def has_gpu_tests(tree: ast.Module) -> bool:
    """A `gpu` mark in a decorator or in the module's `pytestmark`."""
    def names_gpu(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Attribute) and n.attr == "gpu" and isinstance(n.value, ast.Attribute)
                   and n.value.attr == "mark" for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if any(names_gpu(d) for d in node.decorator_list):
                return True
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
            if names_gpu(node.value):
                return True
    return False


GUARDS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def _module_level(body: list[ast.stmt]):
    """The statements run at import, through if/try/with blocks; not functions' bodies, not
    `if TYPE_CHECKING:`, not a `try:` body whose handler catches ImportError (a guarded import)."""
    for node in body:
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            caught = " ".join(ast.unparse(h.type) if h.type else "BaseException" for h in node.handlers)
            if not any(re.search(rf"\b{name}\b", caught) for name in GUARDS):
                yield from _module_level(node.body)
            for handler in node.handlers:
                yield from _module_level(handler.body)
            yield from _module_level(node.orelse)
            yield from _module_level(node.finalbody)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)
        else:
            yield node


def imported_names(tree: ast.Module, package: str) -> list[str]:
    """Dotted names imported at module level (`from a import b` gives a and a.b)."""
    names = []
    for node in _module_level(tree.body):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def local_file(name: str, root: Path) -> Path | None:
    """This repository's file for a module name (tests/ is on sys.path under pytest), else None."""
    parts = name.split(".")
    for base in (root, root / "tests"):
        for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return candidate
    return None


def absent_import_chain(path: Path, root: Path) -> list[str] | None:
    """The import chain from `path` to a package absent on the GPU machine, or None."""
    queue, seen = [(path, [str(path.relative_to(root))])], {path}
    while queue:
        file, chain = queue.pop(0)
        package = ".".join(file.relative_to(root).with_suffix("").parts[:-1])
        for name in imported_names(ast.parse(file.read_text()), package):
            if name.split(".")[0] in ABSENT_THERE:
                return chain + [name]
            dotted = name.split(".")
            for depth in range(1, len(dotted) + 1):  # importing a.b.c runs a and a.b first
                found = local_file(".".join(dotted[:depth]), root)
                if found is not None and found not in seen:
                    seen.add(found)
                    queue.append((found, chain + [".".join(dotted[:depth])]))
    return None


def select(root: Path) -> tuple[list[str], dict[str, list[str]]]:
    """(test files to run, {test file left out: its import chain to an absent package})."""
    chosen, left_out = [], {}
    for path in sorted((root / "tests").glob("test_*.py")):
        if not has_gpu_tests(ast.parse(path.read_text())):
            continue
        chain = absent_import_chain(path, root)
        if chain is None:
            chosen.append(str(path.relative_to(root)))
        else:
            left_out[str(path.relative_to(root))] = chain
    return chosen, left_out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="repository root")
    root = Path(parser.parse_args(argv).root).resolve()
    chosen, left_out = select(root)
    for file, chain in left_out.items():
        print(f"{file}: gpu tests not run, its imports reach {chain[-1]}: {' -> '.join(chain)}", file=sys.stderr)
    for file in chosen:
        print(file)


if __name__ == "__main__":
    main()
