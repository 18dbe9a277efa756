"""The import graph of the resjax package, read from the source with ``ast``; fails on a cycle.

    python tools/import_graph.py            # src/resjax: one line per module, then the verdict
    python tools/import_graph.py PACKAGE_DIR

Every ``import`` statement counts, also one inside a function: a cycle deferred to call time is
still a cycle in the layering. Importing ``a.b.c`` counts as importing ``a.b`` too (Python runs a
package's ``__init__`` first). Exit status 1 and the cycles' modules when there is a cycle, else 0.
"""

from __future__ import annotations

import ast
import pathlib
import sys


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = list(path.relative_to(root.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, name: str, is_package: bool) -> set[str]:
  """The modules and names a module's import statements name, as absolute dotted names."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the module's own package upwards
        package = name.split(".")[:len(name.split(".")) - node.level + is_package]
        base = ".".join(package + ([base] if base else []))
      out.add(base)
      out.update(f"{base}.{alias.name}" for alias in node.names)
  return out


def graph(root: pathlib.Path) -> dict[str, set[str]]:
  """module -> the package's modules it imports (and their parent packages)."""
  files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
  edges = {}
  for name, path in files.items():
    names = imported(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py")
    deps = set()
    for n in names:
      parts = n.split(".")
      deps.update(m for m in (".".join(parts[:k]) for k in range(1, len(parts) + 1)) if m in files)
    edges[name] = deps - {name, root.name}  # the top package's __init__ imports nothing of its own
  return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def main(argv: list[str]) -> int:
  root = pathlib.Path(argv[1] if len(argv) > 1 else
                      pathlib.Path(__file__).resolve().parents[1] / "src" / "resjax")
  edges = graph(root)
  prefix = root.name + "."
  short = lambda m: m[len(prefix):] if m.startswith(prefix) else m
  for m in sorted(edges):
    print(f"{short(m):24} -> {', '.join(sorted(short(d) for d in edges[m])) or '-'}")
  found = cycles(edges)
  n_edges = sum(len(d) for d in edges.values())
  if found:
    for c in found:
      print(f"cycle: {' <-> '.join(short(m) for m in c)}", file=sys.stderr)
    return 1
  print(f"{len(edges)} modules, {n_edges} imports between them, no cycle")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
