"""`import xbackend` and `xbackend --help` must work without torch or mlx (STYLE rule 4)."""

import os
import subprocess
import sys

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'mlx', 'moshi', 'moshi_mlx'):
            raise ImportError(f'No module named {name!r} (blocked by test)', name=name)
sys.meta_path.insert(0, Block())
"""


def run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="250")  # wide enough that table cells are not wrapped
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_import_and_help_do_not_load_frameworks():
    proc = run("import runpy, sys\nsys.argv = ['xbackend', '--help']\n"
               "try:\n    runpy.run_module('xbackend', run_name='__main__')\nexcept SystemExit:\n    pass\n"
               "import xbackend\nprint(sorted(m for m in ('torch', 'mlx', 'moshi', 'moshi_mlx') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "capture" in proc.stdout


def test_every_module_imports_without_frameworks():
    proc = run(BLOCKER + "import pkgutil, importlib, xbackend\n"
               "names = [m.name for m in pkgutil.walk_packages(xbackend.__path__, 'xbackend.') if m.name != 'xbackend.__main__']\n"
               "for n in names:\n    importlib.import_module(n)\nprint(len(names))")
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 10


def test_backends_command_explains_missing_frameworks():
    proc = run(BLOCKER + "import sys\nsys.argv = ['xbackend', 'backends']\nfrom xbackend.cli import app\n"
               "try:\n    app()\nexcept SystemExit as e:\n    print('exit', e.code)")
    assert "exit 0" in proc.stdout, proc.stdout + proc.stderr
    assert "not installed" in proc.stdout and "pip install" in proc.stdout
