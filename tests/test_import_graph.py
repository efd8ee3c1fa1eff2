"""The import graph keeps its layers, read from every module's own import statements (the lazy ones
inside functions too). Bottom to top:

    kernels/   standalone ops: imports no other project module
    config     typed data: imports no project module
    model/     knows no corpus, no run folder and no other library's format: kernels and config only
    data/      knows no model: config only
    training/  the trainer's machinery: model, data, kernels, config
    study/     the comparison's and probe's library: everything above, no script
    hf/        Hugging Face interop, beside study/ (neither imports the other): everything below, no
               script; the only package that imports transformers (lazily: a missing one is one line)
    scripts    train, sample, compare, analyze, export (and the benchmarks) on top

and the repository root shows them: the scripts, config.py and folders, each package saying in its
docstring's first line what it holds.
"""
import ast

import pytest

from repo import ROOT
from training import checkpoint

SCRIPTS = {"train", "sample", "compare", "analyze", "export"}
LAYERS = ["kernels", "config", "model", "data", "training", "study", "hf"]
PROJECT = set(LAYERS) | SCRIPTS
TRANSFORMERS = "transformers"  # an optional extra: hf/ alone imports it
FORBIDDEN = {  # layer -> the project modules it may not import
    "kernels": PROJECT - {"kernels"},
    "config": PROJECT - {"config"},
    "model": PROJECT - {"model", "kernels", "config"},
    "data": PROJECT - {"data", "config"},
    "training": {"study", "hf"} | SCRIPTS,
    "study": {"hf"} | SCRIPTS,
    "hf": {"study"} | SCRIPTS,
}


def project_imports(source):
    """{(line, imported project module)} for every import statement in source, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        found |= {(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in PROJECT | {TRANSFORMERS}}
    return found


def wrong_arrows(module, source):
    """["module:line imports x"] for each import that points the wrong way; module is dotted."""
    layer = module.split(".")[0]
    forbidden = set(FORBIDDEN.get(layer, ())) | ({TRANSFORMERS} if layer != "hf" else set())
    return [f"{module}:{line} imports {name}" for line, name in sorted(project_imports(source)) if name in forbidden]


def project_modules():
    skip = {".venv", "tests", "benchmarks", "cache", "runs", "build"}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] not in skip and not parts[0].startswith("."):
            yield ".".join(parts)[:-3].removesuffix(".__init__"), path.read_text()


def test_the_code_keeps_its_layers():
    modules = dict(project_modules())
    assert {"config", "model.norms", "kernels.rmsnorm", "data.prepare", "hf.load", "export"} <= set(modules)
    problems = [p for name, source in modules.items() for p in wrong_arrows(name, source)]
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


@pytest.mark.parametrize("module, source", [  # one wrong arrow per rule
    ("config", "class Config:\n    def validate(self):\n        from model.norms import resolve_norm_stack\n"),
    ("kernels.rmsnorm", "def rms_norm(x):\n    from model.norms import rms_norm as reference\n"),
    ("kernels.rmsnorm", "from config import UserError\n"),
    ("model.diagnostics", "from data.batches import validation_batches\n"),
    ("model.diagnostics", "from training.checkpoint import load_model\n"),
    ("model.gpt", "import train\n"),
    ("data.prepare", "import model.gpt\n"),
    ("data.prepare", "from training.runlog import write_atomic\n"),
    ("training.checkpoint", "from study.report import machine\n"),
    ("training.evaluation", "import train\n"),
    ("study.probe", "from analyze import main\n"),
    ("study.report", "def f():\n    from compare import load_comparison\n"),
    ("training.checkpoint", "def f():\n    import hf\n"),
    ("model.gpt", "from hf.load import load_pretrained\n"),
    ("study.probe", "from hf import load_pretrained\n"),
    ("hf.load", "from study.probe import probe\n"),
    ("hf.export", "import export\n"),
    ("model.layers", "import transformers\n"),
    ("train", "def f():\n    from transformers import AutoModelForCausalLM\n"),
])
def test_a_wrong_arrow_is_found(module, source):
    assert len(wrong_arrows(module, source)) == 1


def test_only_checkpoint_py_spells_checkpoint_file_names():
    names = {checkpoint.WEIGHTS, checkpoint.STATE, checkpoint.META, checkpoint.MANIFEST}
    for script in ("train.py", "compare.py", "sample.py", "analyze.py", "export.py"):
        strings = {node.value for node in ast.walk(ast.parse((ROOT / script).read_text()))
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not strings & names, f"{script} spells {strings & names}: ask checkpoint.py instead"
        assert not any("random_states" in s for s in strings), script


def test_the_root_holds_only_the_scripts_config_and_folders():
    modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert set(modules) <= {f"{name}.py" for name in SCRIPTS} | {"config.py"}, modules


def test_each_package_is_a_layer_and_says_in_one_line_what_it_holds():
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == sorted(set(LAYERS) - {"config"}), packages  # a new package needs its layer rule above
    for package in packages:
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())) or ""
        summary, _, rest = doc.partition("\n")
        assert summary.endswith(".") and len(summary) <= 110, f"{package}/__init__.py: {summary!r}"
        assert not rest or rest.startswith("\n"), f"{package}/__init__.py: the summary is one line, then a blank line"
