"""The upstream reproductions in tools/ run on CPU and check what they claim to compare."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(script, *args):
  return subprocess.run([sys.executable, str(REPO / "tools" / script), *args], capture_output=True,
                        text=True, timeout=300)


def test_bool_select_repro_gates_alike_and_times_all_five():
  r = _run("bool_select_repro.py", "--batch", "2", "--size", "4", "--channels", "3",
           "--repeats", "2")
  assert r.returncode == 0, r.stderr
  last = r.stdout.strip().splitlines()[-1]
  for name in ("multiply", "mask select", "mask multiply", "mask AND", "output select"):
    assert f"{name}: " in last
  assert last.split("   ")[0].endswith("(1.0x)")  # the reference against itself


def test_scan_conv_repro_agrees_and_times_both():
  r = _run("scan_conv_repro.py", "--units", "2", "--channels", "2", "--size", "4", "--batch", "2",
           "--repeats", "1")
  assert r.returncode == 0, r.stderr
  assert "scan / unrolled:" in r.stdout
