"""tools/import_graph.py: resjax's modules import one another without a cycle; the check can
fail."""

import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", REPO / "tools" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)


def test_resjax_has_no_import_cycle(capsys):
  assert import_graph.main(["import_graph.py"]) == 0
  assert capsys.readouterr().out.splitlines()[-1].endswith("no cycle")
  edges = import_graph.graph(REPO / "src" / "resjax")
  # The layering the README describes: data below tasks below the trainer; the bench above it.
  assert "resjax.train" not in edges["resjax.tasks"]
  assert "resjax.models.layers" in edges["resjax.models.shortcuts"]
  assert not any(m.startswith("resjax.bench") for core, deps in edges.items()
                 if not core.startswith("resjax.bench") for m in deps)


def test_a_cycle_through_a_lazy_or_relative_import_fails(tmp_path, capsys):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from pkg import b\n")
  (pkg / "b.py").write_text("def f():\n  from pkg.sub import c\n")
  (pkg / "sub" / "c.py").write_text("from .. import a\n")
  (pkg / "d.py").write_text("import pkg.a\n")  # imports into the cycle, is not part of it
  assert import_graph.main(["import_graph.py", str(pkg)]) == 1
  assert capsys.readouterr().err.strip() == "cycle: a <-> b <-> sub.c"
