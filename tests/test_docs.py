"""The README and docs/ pages agree with the tree: every ``python -m prefopt...`` module they name
exists and runs as a command, every Hydra command they show composes, every relative link (and its
#anchor) resolves, every docs page is linked from the README, the config and loss tables list
options that exist, and the README's layout tree has one line per module of ``prefopt/``."""

from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from doc_commands import (
    DOCS,
    EXPERIMENT_PAGES,
    PAGES,
    README,
    ROOT,
    TINY,
    Result,
    Tiny,
    code_blocks,
    commands,
    free_port,
    rel,
    run_module,
    shown,
    tiny,
)
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from prefopt.checks import validate_config

CONF = ROOT / "conf"
_rel, _code_blocks, _commands = rel, code_blocks, commands  # the extraction lives in doc_commands


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


# ---- every shown command runs, at tiny scale (the substitution rule: tests/doc_commands.py) ----


@dataclass(frozen=True)
class Ends:
    """How a shown command ends here under the rule, and why it cannot train on this machine.
    ``code`` None: not run at all."""

    why: str
    code: int | None = 2
    says: str = ""


SLURM = Ends("submits to SLURM: tests/test_slurm.py runs the sbatch scripts as shipped", None)
UF = "prefopt hub error: dataset 'openbmb/UltraFeedback' is not in the local Hugging Face cache"
LLAMA3_UF = "prefopt hub error: dataset 'princeton-nlp/llama3-ultrafeedback' is not in the local"
HUB_DATA = "a Hub dataset: offline, the run stops after the plan with the hub error naming it"
TORCHRUN = "; torchrun reports the failed rank (exit 1)"
ENDS = {
    "make install": Ends(
        "installs packages into this environment: .ci/run runs the same steps", None
    ),
    "make gpu-check": Ends("needs CUDA: it is the GPU check itself (tests/gpu)", None),
    "python -m prefopt.train model=llama3_8b_instruct loss=refa_dynamic dataset=ultrafeedback "
    "optimizer.lr=5e-7 logger.group=refa-sweep": Ends(HUB_DATA, 2, UF),
    "python -m prefopt.train dataset=local dataset.path=/data/mine.jsonl "
    "dataset.schema=armorm": Ends(
        "a path the user fills in: the run stops with the data error naming it",
        2,
        "/data/mine.jsonl",
    ),
    "torchrun --nproc_per_node 8 -m prefopt.train experiment=simpo_llama3_instruct": Ends(
        HUB_DATA + TORCHRUN, 1, LLAMA3_UF
    ),
    "torchrun --nproc_per_node 8 -m prefopt.train experiment=refa_mistral7b_base": Ends(
        HUB_DATA + TORCHRUN, 1, UF
    ),
    "python -m prefopt.train experiment=simpo_llama3_instruct": Ends(HUB_DATA, 2, LLAMA3_UF),
    # a sweep records a failed job and goes on (exit 0): its job stops at the Hub dataset
    "python -m prefopt.train -m experiment=refa_mistral7b_base +sweep=refa": Ends(
        HUB_DATA + " (the sweep records the failed job)",
        0,
        "job 0 failed: dataset 'openbmb/UltraFeedback'",
    ),
    "python -m prefopt.train -m experiment=simpo_mistral_base +sweep=simpo "
    "optimizer.lr=3e-7,5e-7": Ends(
        HUB_DATA + " (the sweep records the failed job)",
        0,
        "job 0 failed: dataset 'HuggingFaceH4/ultrafeedback_binarized'",
    ),
    "python -m prefopt.train model=llama3_8b_instruct +model/lora=default model.quantize=4bit "
    "loss=dpo trainer=gpu ~experiment": Ends(
        "QLoRA needs CUDA (bitsandbytes): the config error names it; tests/gpu/test_options_gpu.py",
        2,
        "prefopt config error: model.quantize=4bit uses bitsandbytes",
    ),
    "python -m prefopt.eval.generate prompts=alpaca_eval model=checkpoint "
    "model.name_or_path=<run>/final": Ends(
        "a Hub prompt set: offline, the hub error names it", 2, "'tatsu-lab/alpaca_eval'"
    ),
    "python -m prefopt.eval.generate prompts=arena_hard model=checkpoint "
    "model.name_or_path=<run>/final": Ends(
        "a Hub prompt set: offline, the hub error names it", 2, "'lmarena-ai/arena-hard-auto'"
    ),
    "python -m prefopt.eval.evaluate tasks=[judge] judge.outputs=A/model_outputs.json "
    "judge.baseline=B/model_outputs.json "
    "judge.reward_model=Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": Ends(
        "paths the user fills in (A/, B/): the run stops naming the first", 2, "A/model_outputs"
    ),
    'python -m prefopt.sweeps.expand submit --sbatch "--partition=gpu --gpus-per-node=1 '
    '--time=8:00:00" -- +sweep=refa experiment=refa_mistral7b_base': SLURM,
    "python -m prefopt.train -m hydra/launcher=slurm hydra.launcher.partition=gpu "
    "+sweep=refa": SLURM,
}


def _ends(line: str) -> Ends | None:
    if line.startswith("sbatch "):
        return SLURM
    return ENDS.get(line)


SHOWN = shown()


def test_every_end_in_the_table_is_a_shown_command():
    lines = {c.line for c in SHOWN}
    assert set(ENDS) <= lines, set(ENDS) - lines
    assert len(SHOWN) >= 35


@pytest.fixture(scope="module")
def tiny_outputs(tmp_path_factory):
    """What the placeholders stand for: a tiny run's export (<run>), its generations (<gen dir>)."""
    tmp = tmp_path_factory.mktemp("made")
    os.environ.setdefault("PREFOPT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    made = run_module("prefopt.train", [*TINY["prefopt.train"], "trainer.export_final=true"], tmp)
    assert made.code == 0, made.out[-2000:]
    run = next((tmp / "outputs").rglob("summary.json")).parent
    args = ["model=checkpoint", f"model.name_or_path={run}/final", *TINY["prefopt.eval.generate"]]
    gen = run_module("prefopt.eval.generate", args, tmp)
    assert gen.code == 0, gen.out[-2000:]
    gen_dir = next((tmp / "outputs" / "generate").rglob("model_outputs.json")).parent
    return {"<run>": str(run), "<gen dir>": str(gen_dir)}


def _newest(cwd: Path, line: str) -> dict[str, str]:
    """``dir/<time>``: the newest entry of ``dir`` an earlier command of the page wrote."""
    found = {}
    for parent in re.findall(r"(\S+)/<time>", line):
        entries = sorted((cwd / parent).iterdir(), key=lambda p: p.stat().st_mtime)
        found[f"{parent}/<time>"] = str(entries[-1])
    return found


def _run_torchrun(cmd: Tiny, cwd: Path) -> Result:
    entry = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cmd.ranks}"]
    entry += [f"--master_port={free_port()}", "-m", cmd.module, *cmd.args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(entry, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return Result(proc.returncode, proc.stdout + proc.stderr)


@pytest.fixture()
def hub_offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this process (huggingface_hub and datasets read it at import)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("page", sorted({c.page for c in SHOWN}))
def test_shown_commands_run(page, tmp_path, tiny_outputs, hub_offline):
    """The page's commands in order, from one directory (as a reader follows the page), each
    under the substitution rule; each trains (exit 0) or ends as ENDS says."""
    failures = []
    for shown_cmd in (c for c in SHOWN if c.page == page):
        end = _ends(shown_cmd.line)
        if end is not None and end.code is None:
            continue
        if shown_cmd.line.startswith("make "):
            failures.append(f"{shown_cmd.line}: a make target without an entry in ENDS")
            continue
        places = {**tiny_outputs, **_newest(tmp_path, shown_cmd.line)}
        cmd = tiny(shown_cmd.line, places)
        if cmd.ranks > 1:
            result = _run_torchrun(cmd, tmp_path)
        else:
            result = run_module(cmd.module, cmd.args, tmp_path)
        want = 0 if end is None else end.code
        ok = result.code == want and (end is None or end.says in result.out)
        if cmd.pipe is not None:
            ok = ok and cmd.pipe in result.out
        if end is None or cmd.ranks == 1:  # our own errors: one block, no traceback
            ok = ok and "Traceback" not in result.out
        if not ok:
            failures.append(f"{shown_cmd.line}\n  -> exit {result.code}:\n{result.out[-1500:]}")
    assert not failures, "\n\n".join(failures)
