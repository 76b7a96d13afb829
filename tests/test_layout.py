"""The product (the method, inference and the app) never depends on the lab (scenes, trainer,
probes, recipes); the lab may use the product."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DISPATCHER = ROOT / "model" / "cli.py"  # hands lab subcommands (train, eval, probe) to the lab, lazily


def product_files() -> list[Path]:
    files = [*ROOT.glob("model/*.py"), *ROOT.glob("duet_viz/*.py"), ROOT / "app.py"]
    return [f for f in files if f != DISPATCHER]


def imported_modules(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports, at any depth of the file."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def test_no_product_file_imports_the_lab():
    offenders = {str(f.relative_to(ROOT)): [m for m in imported_modules(f) if m.startswith("model.lab")]
                 for f in product_files()}
    assert len(product_files()) > 15
    assert {f: m for f, m in offenders.items() if m} == {}


def test_the_import_scan_sees_relative_lab_imports(tmp_path):
    """The scan itself: a relative import of the lab from model/ is caught."""
    probe = ROOT / "model" / "_layout_probe.py"
    probe.write_text("from .lab import scenes\nfrom . import decoder\n")
    try:
        assert imported_modules(probe)[:2] == ["model.lab", "model.lab.scenes"]
    finally:
        probe.unlink()


def test_loading_the_app_and_answering_loads_no_lab_module(tiny_checkpoint):
    code = ("import sys, app, model.bench, model.fitprune, model.cli\n"
            "from model.engine import DuetLlava\n"
            "from PIL import Image\n"
            f"DuetLlava.load({str(tiny_checkpoint)!r}, device='cpu').answer(Image.new('RGB', (64, 64)), 'what ?')\n"
            "print(sorted(m for m in sys.modules if m.startswith('model.lab')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
