"""Exercise the installed sftkey-plugin wheel; run by scripts/check_wheel.sh with ``python -I`` from an empty folder.

Fails (exit 1, via AssertionError) unless the package comes from the installed wheel, its version is the metadata's,
it carries the licence text its metadata declares, every public name imports, its entry points are exactly those
pyproject.toml declares (group, name and target: a build that drops one fails) and each resolves, and the ``sftkey``
command and its subcommands run: ``sftkey demo`` as a tiny ``sftkey ab`` run, ``sftkey ab report`` and ``sftkey ab
--dry-run``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata as metadata
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import tomllib  # standard library from Python 3.11 (the wheel environment's); ruff's py310 target sorts it apart

DIST = "sftkey-plugin"
# The TRL extra is installed; Axolotl is not (4 GB): its entry points are checked without importing axolotl
OPTIONAL_FRAMEWORKS = {"axolotl"}
# The groups users rely on: the command, the built-in finders, `axolotl sftkey-preview`, and Axolotl >= 0.21 loading
# the plugin for `sftkey: true` alone; pyproject.toml must keep declaring them
RELIED_ON_GROUPS = {"console_scripts", "sftkey_plugin.finders", "axolotl.cli_commands", "axolotl.plugins"}
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def check_installed_from_wheel(dist_dir: Path) -> metadata.Distribution:
    """The package is the wheel's files in site-packages, not an editable or source-tree import."""
    import sftkey_plugin

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(sftkey_plugin.__file__).resolve().is_relative_to(site), sftkey_plugin.__file__
    dist = metadata.distribution(DIST)
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    assert "archive_info" in direct_url and not direct_url.get("dir_info"), direct_url
    wheels = [path.name for path in dist_dir.glob("*.whl")]
    assert wheels == [f"sftkey_plugin-{dist.version}-py3-none-any.whl"], (wheels, dist.version)
    assert sftkey_plugin.__version__ == dist.version, (sftkey_plugin.__version__, dist.version)
    return dist


def check_license(dist: metadata.Distribution) -> str:
    """The metadata's SPDX licence, with its text installed beside the metadata (PEP 639 ``License-File``)."""
    expression, files = dist.metadata["License-Expression"], dist.metadata.get_all("License-File") or []
    assert expression == "Apache-2.0" and files == ["LICENSE"], (expression, files)
    text = dist.read_text("licenses/LICENSE") or ""
    assert "Apache License" in text and "Version 2.0, January 2004" in text, text[:200]
    return f"{expression} ({files[0]})"


def check_public_names() -> list[str]:
    """Every name in the ``__all__`` of the package and of its TRL adapter imports (the lazy ones included)."""
    imported = []
    for module_name in ("sftkey_plugin", "sftkey_plugin.trl"):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module_name}.{name}"
            imported.append(f"{module_name}.{name}")
    return imported


def _bound_at_top_level(path: Path, name: str) -> bool:
    """Whether a module's source defines or imports ``name`` at its top level (checked without importing it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return True
        if isinstance(node, ast.ImportFrom | ast.Import) and any((a.asname or a.name) == name for a in node.names):
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
    return False


def _module_file(dist: metadata.Distribution, module: str) -> Path:
    """The installed file of a module of the wheel, found in its RECORD (find_spec would import the parents)."""
    stem = module.replace(".", "/")
    for file in dist.files or []:
        if str(file) in (f"{stem}.py", f"{stem}/__init__.py"):
            return Path(str(dist.locate_file(file)))
    raise AssertionError(f"the wheel has no module {module}")


def check_entry_point(dist: metadata.Distribution, entry_point: metadata.EntryPoint) -> str:
    """Load the entry point; one whose module needs a framework not installed here (Axolotl) is checked statically:
    its module is a file the wheel installed, and it defines or imports the attribute at its top level."""
    try:
        entry_point.load()
        return "loaded"
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in OPTIONAL_FRAMEWORKS:
            raise
        missing = error.name
    path = _module_file(dist, entry_point.module)
    assert path.is_file(), path
    assert entry_point.attr is None or _bound_at_top_level(path, entry_point.attr), entry_point
    return f"defined in {path.name} (not imported: needs {missing})"


def declared_entry_points(pyproject: Path) -> set[tuple[str, str, str]]:
    """``(group, name, target)`` of every entry point pyproject.toml declares, its ``[project.scripts]`` included."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    groups = {"console_scripts": project.get("scripts", {}), "gui_scripts": project.get("gui-scripts", {})}
    groups.update(project.get("entry-points", {}))
    return {(group, name, target) for group, points in groups.items() for name, target in points.items()}


def check_entry_points(dist: metadata.Distribution, declared: set[tuple[str, str, str]]) -> dict[str, str]:
    """The installed metadata's entry points are exactly the declared ones, among them the groups users rely on, and
    every one resolves."""
    assert {group for group, _, _ in declared} >= RELIED_ON_GROUPS, declared
    installed = {(entry_point.group, entry_point.name, entry_point.value) for entry_point in dist.entry_points}
    assert installed == declared, {"missing from the wheel": declared - installed, "not declared": installed - declared}
    return {f"{ep.group}: {ep.name} = {ep.value}": check_entry_point(dist, ep) for ep in dist.entry_points}


def check_finders_come_from_the_entry_point() -> None:
    """The built-in finders are registered through the installed entry point, not the source-checkout fallback."""
    from sftkey_plugin import find_key_spans, finder_names
    from sftkey_plugin.hookspecs import get_plugin_manager

    distinctions = get_plugin_manager().list_plugin_distinfo()
    assert any(d.project_name == DIST and p.__name__ == "sftkey_plugin.finders" for p, d in distinctions), distinctions
    assert {"tags", "gsm8k", "boxed", "answer_is"} <= set(finder_names()), finder_names()
    text = "<Thinking>2+2</Thinking>\n<Answer>4</Answer>"
    assert find_key_spans(text, "tags") == [(len("<Thinking>2+2</Thinking>"), len(text))]


def sftkey(*arguments: str) -> str:
    """Run the installed ``sftkey`` console script; its stdout, or an AssertionError with its output."""
    command = [str(Path(sys.executable).parent / "sftkey"), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def check_commands(version: str) -> list[str]:
    """``sftkey --help``, ``--version`` and every subcommand's ``--help`` (the subcommands as the parser lists them)."""
    from sftkey_plugin.cli.main import build_parser

    assert "sftkey demo" in sftkey("--help")
    assert sftkey("--version").strip() == f"sftkey {version}"
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in subparsers.choices:
        text = sftkey(name, "--help")
        assert f"usage: sftkey {name}" in text, name
        assert name != "train" or "--sftkey_mode" in text, text  # TrlParser's help: every key `sftkey train` reads
    return sorted(subparsers.choices)


def check_demo(output_dir: Path) -> float:
    """``sftkey demo`` (``sftkey ab`` on its generated task and tiny model: 2 arms x 1 seed x 2 steps) trains each
    unit through the installed ``sftkey train`` and scores it through ``sftkey eval``; its wall time."""
    started = time.perf_counter()
    arguments = ("--quick", "--steps", "2", "--arms", "sft,weighted_x2", "--device", "cpu", "--no-plot", "--json")
    report = json.loads(sftkey("demo", *arguments, "--output-dir", str(output_dir)))
    assert report["max_steps"] == 2 and list(report["arms"]) == ["sft", "weighted_x2"], report
    assert [unit["status"] for unit in report["units"]] == ["ok", "ok"], report["units"]
    for arm, scores in report["scores"].items():
        assert 0 <= scores["accuracy"]["0"] <= 1, (arm, scores)
    plan = json.loads((output_dir / "plan.json").read_text(encoding="utf-8"))
    assert all(unit["command"][0] == sys.executable for unit in plan["units"]), plan["units"]  # this venv's python
    assert "weighted_x2 - sft:" in sftkey("ab", "report", str(output_dir))
    return time.perf_counter() - started


def check_ab_plan(demo_dir: Path) -> int:
    """``sftkey ab --dry-run`` on the demo's TRL config and test set: one runnable config per arm and seed, the
    command that trains each, nothing trained; the number of units."""
    out = demo_dir / "dry-run"
    config, test = str(demo_dir / "config.yaml"), str(demo_dir / "test.jsonl")
    printed = sftkey("ab", config, "--eval", test, "--arms", "sft,two_stage", "--seeds", "0,1", "--out", str(out),
                     "--dry-run")  # fmt: skip
    plan = json.loads((out / "plan.json").read_text(encoding="utf-8"))
    assert [unit["name"] for unit in plan["units"]] == ["sft-seed0", "two_stage-seed0", "sft-seed1", "two_stage-seed1"]
    for unit in plan["units"]:
        assert (out / unit["config"]).is_file() and not (out / unit["dir"] / "train.log").exists(), unit
        assert unit["command"][:3] == [sys.executable, "-m", "sftkey_plugin.cli.train"], unit["command"]
        assert " ".join(unit["command"]) in printed, printed
    return len(plan["units"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dist", type=Path, required=True, help="the folder holding the built wheel")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT, help="what declares the entry points")
    options = parser.parse_args()
    dist_dir = options.dist
    dist = check_installed_from_wheel(dist_dir)
    print(f"installed from the wheel: {DIST} {dist.version}")
    print(f"licence: {check_license(dist)}")
    print(f"public names import: {', '.join(check_public_names())}")
    for entry_point, how in check_entry_points(dist, declared_entry_points(options.pyproject)).items():
        print(f"entry point {entry_point}: {how}")
    check_finders_come_from_the_entry_point()
    print("finders: registered through the installed entry point")
    print(f"sftkey --help, --version and --help of: {', '.join(check_commands(dist.version))}")
    demo_dir = Path.cwd() / "demo"
    print(
        f"sftkey demo --quick --steps 2 (sftkey ab, 2 arms x 1 seed) and sftkey ab report: {check_demo(demo_dir):.0f} s"
    )
    print(f"sftkey ab --dry-run on the demo's TRL config: {check_ab_plan(demo_dir)} units planned")


if __name__ == "__main__":
    main()
