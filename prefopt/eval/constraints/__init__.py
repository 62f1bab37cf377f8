"""Offline constraint-following benchmark: prompt generators and programmatic verifiers.

Thirteen task families, each generated from the word lists in ``words`` and scored by reading the
response text. Stdlib only; the same arguments give the same tasks on every machine. Scores are
graded 0..10 so a group of sampled responses rarely ties:

    answer families (arithmetic larger case capital list reverse backwards number_words):
        10 exact | 5-6 right content, wrong format | 3-3.9 on-topic but wrong
        | 1 refusal | 0.5 off-topic | 0 empty
    constraint families (word_count keywords lowercase ending lowercase_keyword), IFEval-style:
        10 every constraint met | 3-9 on-topic, by the mean per-constraint credit
        | 0.5-2.9 topic never mentioned, by the same credit | 1 refusal | 0 empty

Splits are decided by a hash of the prompt text, so train and heldout never share a prompt.

Modules: ``words`` (word lists, prompt templates), ``verifiers`` (scoring a response),
``families`` (the generators and the ``FAMILIES`` registry), ``tasks`` (``Task``, splits,
``make_tasks``, ``verify``, JSONL rows), ``__main__`` (the CLI):

    python -m prefopt.eval.constraints --split heldout --n 64 --seed 0 --out tasks.jsonl
"""

from prefopt.eval.constraints.families import FAMILIES, Family
from prefopt.eval.constraints.tasks import (
    HELDOUT_PERCENT,
    SPLITS,
    Task,
    Verdict,
    ideal_response,
    make_tasks,
    satisfaction,
    split_of,
    task_from_row,
    task_row,
    verify,
)
from prefopt.eval.constraints.verifiers import Params, answer

__all__ = [
    "FAMILIES",
    "HELDOUT_PERCENT",
    "SPLITS",
    "Family",
    "Params",
    "Task",
    "Verdict",
    "answer",
    "ideal_response",
    "make_tasks",
    "satisfaction",
    "split_of",
    "task_from_row",
    "task_row",
    "verify",
]
