"""The training-data schema the benchmark provides, ``dataset.schema=constraints_reference``:
registered in the data layer's schema registry (``prefopt.data.schemas``) from here, so that the
data layer never imports the benchmark. The training package imports this module
(``prefopt/train/__init__.py``), as does every entry point that parses training rows.
"""

from __future__ import annotations

from typing import Any

from prefopt.data.example import DataError, Example
from prefopt.data.schemas import ParseOptions, parse_canonical, register_schema
from prefopt.eval import constraints


@register_schema("constraints_reference")
def parse_constraints_reference(row: dict[str, Any], where: str, opts: ParseOptions) -> Example:
    """A row of the offline constraint benchmark (canonical keys plus the task's ``family`` and
    ``params``, as ``prefopt.eval.datagen`` writes them) with the benchmark's reference answer
    appended as one more response, scored by the task's verifier (10, a pass).

    The embedded default uses it: the model's own samples of a prompt differ by task-specific
    partial credit that does not carry over to unseen prompts, while "the reference answer over
    the model's own samples" does, so a few CPU steps move the held-out reward accuracy.
    """
    example = parse_canonical(row, where, opts)
    try:
        task = constraints.task_from_row(row, where)
    except ValueError as e:
        wants = "dataset.schema=constraints_reference wants the benchmark's rows"
        raise DataError(f"{e} ({wants})") from None
    reference = constraints.ideal_response(task)
    score = constraints.verify(task, reference).score
    return Example(
        example.prompt, [*example.responses, reference], [*example.scores, score], example.id
    )
