"""The commands README.md, docs/*.md and experiments/README.md show, and how the tests run them.

Extraction: the lines of fenced code blocks, ``\\`` continuations joined, trailing comments dropped
(``commands``); ``shown`` keeps those that start with ``python -m prefopt``, ``torchrun``,
``make`` or ``sbatch``, with their page.

The substitution rule (README, "Tests"), applied by ``tiny``; nothing else is changed:
1. each entry point gets its tiny suffix (TINY) after the command's own overrides (before flags
   such as ``--cfg``), so they win over its model, trainer, recipe and experiment; the memory plan
   needs none;
2. ``torchrun --nproc_per_node N`` runs 2 gloo ranks on CPU, with a free ``--master_port``;
3. a sweep (``-m``) runs the first value of each swept key;
4. a placeholder ``<...>`` becomes what the tests made for it (PLACEHOLDERS: a tiny run's
   export, its generations, the sweep dir an earlier command wrote);
and every command runs from a fresh directory with the Hub offline (HF_HUB_OFFLINE=1) and one
shared model cache (PREFOPT_CACHE). How a command that needs the Hub, CUDA or a cluster ends is
listed, with the reason, in tests/test_docs.py (ENDS).
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
EXPERIMENT_PAGES = sorted((ROOT / "experiments").glob("*.md"))
RUNNABLE = re.compile(r"^(python -m prefopt|torchrun |make |sbatch )")

TINY = {
    "prefopt.train": [
        "model=tiny",
        "trainer=debug",
        "trainer.max_steps=2",
        "logger=none",
        "dataset.max_train_examples=16",
        "dataset.max_eval_examples=8",
    ],
    "prefopt.eval.generate": ["prompts.n=2", "generation.max_new_tokens=4"],
    "prefopt.eval.evaluate": ["prompts.n=2", "generation.max_new_tokens=4"],
    "prefopt.eval.datagen": ["model=tiny", "prompts.n=2", "generation.max_new_tokens=4"],
    "prefopt.eval.ursla": ["model=tiny", "max_examples=2", "lengths=[1,5]"],
}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)


def commands(text: str) -> list[str]:
    """Shell lines of the fenced blocks, ``\\`` continuations joined, trailing comments dropped."""
    lines = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#(?!\{).*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(re.sub(r"\s+", " ", line))
    return lines


@dataclass(frozen=True)
class Shown:
    page: str  # README.md, docs/x.md
    line: str  # the command as shown (continuations joined)

    @property
    def id(self) -> str:
        return f"{self.page}: {self.line}"


def shown(pages: list[Path] | None = None) -> list[Shown]:
    """Every runnable command of the pages, in page order, each once per page."""
    out: list[Shown] = []
    for page in pages or [*PAGES, *EXPERIMENT_PAGES]:
        for line in dict.fromkeys(commands(page.read_text())):
            if RUNNABLE.match(line):
                out.append(Shown(rel(page), line))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Tiny:
    """A shown command after the substitution rule."""

    module: str  # prefopt.train
    args: list[str]  # its arguments, tiny suffix appended
    ranks: int  # 1: in-process; 2: torchrun, gloo
    pipe: str | None  # `| grep ...` of the shown line: the pattern the output must contain


def tiny(line: str, placeholders: dict[str, str]) -> Tiny:
    """``line`` (a ``python -m prefopt...`` or ``torchrun ... -m prefopt...`` command) under the
    substitution rule."""
    line, _, pipe = line.partition(" | ")
    for name, value in placeholders.items():
        line = line.replace(name, value)
    assert "<" not in line, f"a placeholder without a value: {line}"
    words = shlex.split(line)
    ranks = 2 if words[0] == "torchrun" else 1  # its --nproc_per_node: 2 gloo ranks
    at = words.index("-m")
    module, args = words[at + 1], words[at + 2 :]
    if "-m" in args:  # a sweep: the first value of each swept key, the preset's grid too
        args = [a.split(",")[0] if "=" in a and "[" not in a else a for a in args]
        for preset in (a.removeprefix("+sweep=") for a in args if a.startswith("+sweep=")):
            grid = OmegaConf.load(ROOT / "conf" / "sweep" / f"{preset}.yaml").hydra.sweeper.params
            swept = {a.partition("=")[0] for a in args}  # a value on the command line wins
            args += [f"{k}={str(v).split(',')[0]}" for k, v in grid.items() if k not in swept]
    flags = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
    args = [*args[:flags], *TINY.get(module, []), *args[flags:]]  # overrides before --cfg
    grep = shlex.split(pipe)[-1] if pipe.startswith("grep") else None
    return Tiny(module, args, ranks, grep)


@dataclass
class Result:
    code: int
    out: str  # stdout and stderr together


def run_module(module: str, args: list[str], cwd: Path) -> Result:
    """``python -m module args`` in this process (runpy, as ``-m`` runs it) from ``cwd``: the
    imports are paid once per test session. Exit code from SystemExit (0 when it returns)."""
    import os

    buf = io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    code = 0
    sys.argv = [module, *args]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return Result(code, buf.getvalue())
