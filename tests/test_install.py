"""A non-editable install works on its own: the shipped recipes are package data, so
`pip install --target T .` followed by `--recipe demo` finds them with no source tree around.

The package is built offline (no index, no build isolation: setuptools comes from the running
environment) from a copy of the sources, so the checkout gets no build/ or egg-info from this
test. The checks then run in a fresh interpreter whose working directory is outside the source
tree and whose `motian` is asserted to be the installed copy (the venv also has the editable
install, which must not be the one imported).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"demo", "motian-base", "motian-1b", "bert-base"}

LOAD_ALL = """
import json, sys
from pathlib import Path
import motian
from motian.train.recipe import load_recipe, shipped_recipes
target = Path(sys.argv[1]).resolve()
assert Path(motian.__file__).resolve().is_relative_to(target), motian.__file__
names = shipped_recipes()
loaded = {name: load_recipe(name).name for name in names}
print(json.dumps({"file": motian.__file__, "names": names, "loaded": loaded}))
"""


def _env(target: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(target)
    env["PYTHONSAFEPATH"] = "1"  # nothing from the working directory goes on sys.path
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(target, an empty working directory), the package installed non-editable into target."""
    base = tmp_path_factory.mktemp("install")
    source, target, work = base / "src", base / "target", base / "work"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "motian", source / "motian", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    work.mkdir()
    env = _env(target)
    del env["PYTHONPATH"]  # the build itself must not see the (still empty) target
    _run(["-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "--target", str(target), str(source)], cwd=work, env=env, timeout=300)
    assert (target / "motian" / "__init__.py").is_file()
    assert not (target / "motian" / "configs" / "__init__.py").exists()
    return target, work


def test_installed_copy_loads_every_shipped_recipe(installed):
    target, work = installed
    out = _run(["-c", LOAD_ALL, str(target)], cwd=work, env=_env(target)).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().is_relative_to(target.resolve())
    assert EXPECTED <= set(report["names"]), report["names"]
    assert report["loaded"] == {name: name for name in report["names"]}
    shipped = sorted(p.stem for p in (target / "motian" / "configs").glob("*.yaml"))
    assert report["names"] == shipped
    # the wheel carries exactly the YAML files of the source tree
    assert shipped == sorted(p.stem for p in (ROOT / "motian" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("args", [["--help"], ["pretrain", "--help"]])
def test_installed_cli_help_runs(installed, args):
    target, work = installed
    check = ("import runpy, sys; from pathlib import Path; import motian; "
             f"assert Path(motian.__file__).resolve().is_relative_to(Path({str(target)!r})"
             ".resolve()), motian.__file__; "
             f"sys.argv = ['motian', *{args!r}]; runpy.run_module('motian.cli', run_name='__main__')")
    proc = _run(["-c", check], cwd=work, env=_env(target))
    assert "usage" in proc.stdout.lower()
