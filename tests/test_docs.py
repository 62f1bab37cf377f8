"""The README and docs/ pages agree with the tree: every ``python -m prefopt...`` module they name
exists and runs as a command, every Hydra command they show composes, every relative link (and its
#anchor) resolves, every docs page is linked from the README, the config and loss tables list
options that exist, and the README's layout tree has one line per module of ``prefopt/``."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from prefopt.checks import validate_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
EXPERIMENT_PAGES = sorted((ROOT / "experiments").glob("*.md"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)


def _commands(text: str) -> list[str]:
    """Shell lines of the fenced blocks, ``\\`` continuations joined, trailing comments dropped."""
    lines = []
    for block in _code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#(?!\{).*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _module_file(dotted: str) -> Path | None:
    """The file ``python -m dotted`` runs from this checkout, or None."""
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def _modules_named(text: str) -> set[str]:
    """Every module given to ``-m`` (python or torchrun), in code blocks and in prose."""
    return set(re.findall(r"-m\s+(prefopt(?:\.\w+)*)", text))


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_module_named_with_dash_m_runs_as_a_command(page):
    named = _modules_named(page.read_text())
    for dotted in sorted(named):
        path = _module_file(dotted)
        assert path is not None, f"{_rel(page)}: `-m {dotted}` names no module file"
        if path.name != "__main__.py":
            assert '__name__ == "__main__"' in path.read_text(), (
                f"{_rel(page)}: `-m {dotted}`: {_rel(path)} has no __main__ block (runs nothing)"
            )


def test_the_scan_finds_the_commands_it_checks():
    """The regex must see the commands the README does show (else the test above checks nothing)."""
    named = set().union(*(_modules_named(p.read_text()) for p in PAGES))
    assert {"prefopt.train", "prefopt.train.plan", "prefopt.eval.evaluate"} <= named
    assert {"prefopt.sweeps.expand", "prefopt.sweeps.report", "prefopt.eval.ursla"} <= named
    assert _module_file("prefopt.nope") is None


def _hydra_config_name(dotted: str) -> str | None:
    """The config a Hydra entry point composes (its ``@hydra.main(config_name=...)``)."""
    m = re.search(r'config_name="(\w+)"', _module_file(dotted).read_text())
    return m.group(1) if m else None


def _overrides(args: list[str]) -> list[str] | None:
    """A shown command's arguments as compose() overrides; None when it cannot be composed as is
    (an Optuna search space). A sweep keeps its first value."""
    sweep = "-m" in args
    out = []
    for a in args:
        if a == "-m" or a.startswith("--"):
            continue
        if "interval(" in a:
            return None
        key, sep, value = a.partition("=")
        if sweep and sep and "," in value and not value.startswith("["):
            a = f"{key}={value.split(',')[0]}"
        out.append(a)
    return out


def _hydra_commands() -> list[tuple[str, str, str, list[str]]]:
    """(where, module file as a dotted name, config name, overrides) per shown command;
    placeholders (``<run dir>``) become a word."""
    found = []
    for page in PAGES:
        for line in _commands(page.read_text()):
            m = re.match(r"(?:python|torchrun)\b.*?-m\s+(prefopt(?:\.\w+)*)(.*)$", line)
            if not m or _module_file(m.group(1)) is None:
                continue
            dotted, rest = m.group(1), shlex.split(re.sub(r"<[^>]*>", "x", m.group(2)))
            name = _hydra_config_name(dotted)
            if dotted == "prefopt.train.plan":  # argparse flags around the training overrides
                name, rest = "train", [a for a in rest if not re.match(r"^--|^\d+$", a)]
            if name is None:
                continue
            overrides = _overrides(["-m"] * line.startswith("python -m prefopt.train -m") + rest)
            if overrides is not None:
                entry = _module_file(dotted).relative_to(ROOT).with_suffix("")
                found.append((f"{_rel(page)}: {line}", ".".join(entry.parts), name, overrides))
    return found


HYDRA_COMMANDS = _hydra_commands()


def test_hydra_commands_are_found():
    names = {name for _, _, name, _ in HYDRA_COMMANDS}
    assert {"train", "generate", "evaluate", "datagen", "ursla"} <= names
    assert len(HYDRA_COMMANDS) >= 20


@pytest.mark.parametrize(
    "where,module,name,overrides", HYDRA_COMMANDS, ids=[c[0] for c in HYDRA_COMMANDS]
)
def test_shown_hydra_command_composes(where, module, name, overrides):
    """Unknown groups, options and keys fail at composition, as they would for the user."""
    # run_dir reads hydra.runtime, which compose() leaves unset (as in tests/test_sweeps.py)
    fixed = ["run_dir=/tmp/x"] if "\nrun_dir:" in (CONF / f"{name}.yaml").read_text() else []
    importlib.import_module(module)  # as `python -m`: the module registers its schemas
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=[*fixed, *overrides], return_hydra_config=True)
    if name == "train":  # what the entry point checks right after composition
        with open_dict(cfg):
            del cfg["hydra"]
        validate_config(cfg)


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"\w+://", t)]


@pytest.mark.parametrize("page", [*PAGES, *EXPERIMENT_PAGES], ids=_rel)
def test_relative_links_and_anchors_resolve(page):
    for target in _links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.exists(), f"{_rel(page)}: link ({target}) points at a missing file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{_rel(page)}: link ({target}): no such heading"


def test_slug_matches_github():
    assert _slug("Precision and low-memory optimizers") == "precision-and-low-memory-optimizers"
    assert _slug("Distributed training (FSDP2, torchrun, multi-node)") == (
        "distributed-training-fsdp2-torchrun-multi-node"
    )
    assert _slug("Evaluation (`prefopt.eval.evaluate`, `tasks=[...]`)") == (
        "evaluation-prefoptevalevaluate-tasks"
    )


def test_every_docs_page_is_linked_from_the_readme_and_says_what_it_covers():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(README)}
    for page in DOCS:
        assert page.resolve() in linked, f"README.md does not link {_rel(page)}"
        first = page.read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 10, f"{_rel(page)}: no title line"


def _table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def _names(cell: str) -> list[str]:
    return [n for n in re.findall(r"`([^`]+)`", cell) if re.fullmatch(r"[a-z0-9_]+", n)]


def test_config_table_options_exist():
    rows = _table_rows(README.read_text(), "| group | options |")
    assert len(rows) >= 9
    checked = 0
    for group_cell, options, _ in rows:
        group = _names(group_cell)[0]
        if group == "recipe":  # "one per model": checked with the model table below
            continue
        for option in _names(options):
            assert (CONF / group / f"{option}.yaml").is_file(), f"conf/{group}/{option}.yaml"
            checked += 1
    assert checked >= 35


def test_model_table_models_have_a_model_and_a_recipe():
    rows = _table_rows(README.read_text(), "| model | recipe")
    models = [m for row in rows for m in _names(row[0])]
    assert sorted(models) == sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
    for m in models:
        assert (CONF / "recipe" / f"{m}.yaml").is_file(), f"conf/recipe/{m}.yaml"


def test_losses_table_lists_every_loss_config():
    rows = _table_rows(README.read_text(), "| name | paper")
    names = [_names(row[0])[0] for row in rows]
    assert sorted(names) == sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))
    groups = _table_rows(README.read_text(), "| group |")
    options = _names(next(row for row in groups if "`loss`" in row[0])[1])
    others = int(re.search(r"and the (\d+) others", README.read_text()).group(1))
    assert options == ["refa_dynamic"] and others == len(names) - 1


def _layout_tree() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Layout") :]
    return _code_blocks(section)[0].splitlines()


def test_layout_tree_has_one_line_per_module():
    """Rebuild each path from the tree's indentation; compare with the package on disk."""
    stack: list[tuple[int, str]] = []
    listed, tops = [], []
    for line in _layout_tree():
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        stack = [(i, n) for i, n in stack if i < indent]
        path = "".join(n for _, n in stack) + name
        if name.endswith("/"):
            stack.append((indent, name))
            if indent == 0:
                tops.append(name.rstrip("/"))
        else:
            listed.append(path)
    on_disk = sorted(_rel(p) for p in (ROOT / "prefopt").rglob("*.py"))
    assert sorted(listed) == on_disk
    assert len(listed) == len(set(listed))
    for top in tops:
        assert (ROOT / top).is_dir(), f"layout names {top}/, which does not exist"
    assert {"prefopt", "conf", "docs", "tests", "slurm", "notebooks", "experiments"} <= set(tops)


TOP = ["prefopt", "conf", "docs", "experiments", "notebooks", "slurm", "tests"]
# Named by the docs but not files of the tree: placeholders of the examples, and outputs that
# the GPU runs write (make gpu-check; results_table.py --device cuda) or --out prefixes.
NOT_YET_FILES = {
    "conf/loss/my_loss.yaml",
    "conf/recipe/X.yaml",
    "experiments/results/gpu_tests.md",
    "experiments/results/offline_table",
    "experiments/results/offline_table_cpu",
}


def _defines(path: Path, name: str) -> bool:
    """Whether a module's top level defines ``name`` (read with ast: no torch import)."""
    for node in ast.parse(path.read_text()).body:
        defs = (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)
        if isinstance(node, defs) and node.name == name:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


def _resolves(dotted: str) -> bool:
    """A module or package of this checkout, or a name defined at the top of one."""
    parts = dotted.split(".")
    if ROOT.joinpath(*parts).is_dir() or ROOT.joinpath(*parts).with_suffix(".py").is_file():
        return True
    module = ROOT.joinpath(*parts[:-1]).with_suffix(".py")
    return module.is_file() and _defines(module, parts[-1])


@pytest.mark.parametrize("page", [*PAGES, *EXPERIMENT_PAGES], ids=_rel)
def test_named_modules_names_and_paths_exist(page):
    text = page.read_text()
    for dotted in sorted(set(re.findall(r"\bprefopt(?:\.[A-Za-z_]\w*)+", text))):
        assert _resolves(dotted), f"{_rel(page)}: {dotted} is no module or name of prefopt/"
    # repository paths; ~/.cache/prefopt/... is the cache, {a,b} a brace list, * a glob
    paths = re.findall(rf"(?<![\w./~{{<-])(?:{'|'.join(TOP)})/[\w/.-]*\w(?![{{\w*<])", text)
    for path in sorted(set(paths) - NOT_YET_FILES):
        assert (ROOT / path).exists(), f"{_rel(page)}: {path} does not exist"


def test_name_resolution_fails_for_missing_names():
    assert _resolves("prefopt.model.load.empty_model") and _resolves("prefopt.train")
    assert not _resolves("prefopt.model.load.no_such_function")
    assert not _resolves("prefopt.evaluation")
