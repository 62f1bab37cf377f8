# .venv/bin/pytest tests/test_generate.py -q
"""Prompt loading, benchmark output formats, one BOS, determinism, resumable results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_config, read_jsonl, write_jsonl
from omegaconf import OmegaConf
from tokenizers import processors

from prefopt.checks import typed
from prefopt.config import GenerateConfig
from prefopt.data.example import DataError
from prefopt.eval import generate
from prefopt.eval.generate import ResultsLog, check_settings, settings_of
from prefopt.eval.prompts import Prompt, encode_prompts, load_prompts, prompt_from_row
from prefopt.model.load import tiny_tokenizer

# Untied embeddings: the tied tiny model greedily repeats "\n", which decodes to "".
TINY = ("model=tiny", "model.tiny.tie_word_embeddings=false")

ALPACA = [
    {"instruction": "Name a colour.", "output": "x", "generator": "ref", "dataset": "helpful_base"},
    {"instruction": "Write a haiku about the sea.", "output": "", "generator": "ref"},
    {"instruction": "What is 2 + 2?", "dataset": "koala"},
    {"instruction": "  Explain gravity in one sentence, please.  "},
    {"instruction": "Say hi\nin two lines.", "dataset": "oasst"},
]
ARENA = [
    {
        "question_id": "328c149ed45a41c0b9d6f14659e63599",
        "category": "arena-hard-v0.1",
        "cluster": "ABC",
        "turns": [{"content": "Use ABC notation to write a melody."}],
    },
    {
        "question_id": "b43c07656ead4150b360294ee932b410",
        "category": "arena-hard-v0.1",
        "cluster": "C++",
        "turns": [{"content": "Solve this in C++: swap two cards."}],
    },
    {
        "question_id": "1f07cf6d146d4038b2b93aaba3935ce0",
        "category": "arena-hard-v0.1",
        "cluster": "Books",
        "turns": [{"content": "Summarise 'The Alignment Problem'."}],
    },
]


def _cfg(out_dir: Path, *overrides: str, name: str = "generate"):
    return compose_config(name, *TINY, "generation.max_new_tokens=6", *overrides, out_dir=out_dir)


def _prompts_cfg(path: Path, **kw):
    return OmegaConf.create(
        {"name": "local", "source": "file", "path": str(path), "limit": None, **kw}
    )


# ------------------------------------------------------------------ prompt shapes
@pytest.mark.parametrize(
    ("row", "pid", "messages", "meta"),
    [
        (
            {"instruction": "Hi?", "output": "o", "generator": "g", "dataset": "koala"},
            "7",
            [{"role": "user", "content": "Hi?"}],
            {"dataset": "koala"},
        ),
        (
            {
                "question_id": "q1",
                "category": "arena-hard-v0.1",
                "cluster": "C",
                "turns": [{"content": "Hard?"}],
            },
            "q1",
            [{"role": "user", "content": "Hard?"}],
            {"category": "arena-hard-v0.1", "cluster": "C"},
        ),
        (
            {"uid": "u9", "category": "hard_prompt", "prompt": "V2?"},
            "u9",
            [{"role": "user", "content": "V2?"}],
            {"category": "hard_prompt"},
        ),
        (
            {
                "id": "p3",
                "prompt": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "A"},
                    {"role": "assistant", "content": "B"},
                    {"role": "user", "content": "C"},
                ],
                "family": "case",
                "params": {"x": 1},
            },
            "p3",
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "A"},
                {"role": "assistant", "content": "B"},
                {"role": "user", "content": "C"},
            ],
            {"family": "case", "params": {"x": 1}},
        ),
        ({"id": 5, "prompt": "plain"}, "5", [{"role": "user", "content": "plain"}], {}),
    ],
    ids=["alpaca_eval", "arena_hard_v0.1", "arena_hard_v2", "prefopt_messages", "int_id"],
)
def test_prompt_from_row_accepts_each_shape(row, pid, messages, meta):
    p = prompt_from_row(row, 7, "f.jsonl line 8")
    assert p == Prompt(pid, messages, meta)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"question": "no prompt key"}, r"f line 3: no prompt: expected key 'instruction'"),
        ({"instruction": "   "}, r"f line 3: key 'instruction': expected a non-empty string"),
        ({"instruction": 5}, r"f line 3: key 'instruction': expected a non-empty string"),
        ({"uid": "u", "prompt": ""}, r"f line 3: key 'prompt': expected a non-empty string"),
        (
            {"question_id": "q", "turns": [{"content": "a"}, {"content": "b"}]},
            r"f line 3: key 'turns': expected one turn.*multi-turn",
        ),
        ({"question_id": "q", "turns": "text"}, r"f line 3: key 'turns'"),
        ({"question_id": "q", "turns": [{"content": ""}]}, r"f line 3: key 'turns\[0\].content'"),
        (
            {
                "id": "x",
                "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            },
            r"f line 3: key 'prompt': chat messages must end with a user turn",
        ),
        ({"id": "x", "prompt": []}, r"f line 3: key 'prompt'"),
        ({"id": "x", "prompt": [{"role": "user"}]}, r"f line 3: key 'prompt'"),
        (["instruction", "a list"], r"f line 3: expected a JSON object, got list"),
        ("just text", r"f line 3: expected a JSON object, got str"),
    ],
)
def test_prompt_from_row_errors_name_location_and_key(row, match):
    with pytest.raises(DataError, match=match):
        prompt_from_row(row, 2, "f line 3")


def test_prompt_from_row_rejects_empty_last_user_message():
    with pytest.raises(DataError, match="key 'prompt'"):
        prompt_from_row({"id": "x", "prompt": [{"role": "user", "content": "  "}]}, 0, "f")


def test_load_prompts_from_json_list_and_jsonl(tmp_path):
    js = tmp_path / "alpaca.json"
    js.write_text(json.dumps(ALPACA, indent=2))
    ps = load_prompts(_prompts_cfg(js))
    assert [p.id for p in ps] == ["0", "1", "2", "3", "4"]
    assert [p.messages[-1]["content"] for p in ps] == [r["instruction"] for r in ALPACA]
    assert [p.meta.get("dataset") for p in ps] == ["helpful_base", None, "koala", None, "oasst"]
    assert [p.id for p in load_prompts(_prompts_cfg(js, limit=2))] == ["0", "1"]

    jl = write_jsonl(tmp_path / "q.jsonl", ARENA)
    with jl.open("a") as f:
        f.write("\n   \n")  # blank lines are skipped
    ps = load_prompts(_prompts_cfg(jl))
    assert [p.id for p in ps] == [r["question_id"] for r in ARENA]
    assert ps[1].meta == {"category": "arena-hard-v0.1", "cluster": "C++"}


def test_load_prompts_errors(tmp_path):
    dup = write_jsonl(
        tmp_path / "dup.jsonl", [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]
    )
    with pytest.raises(DataError, match="prompt id 'a' appears twice"):
        load_prompts(_prompts_cfg(dup))
    assert len(load_prompts(_prompts_cfg(dup, limit=1))) == 1  # the duplicate is past the limit
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: invalid JSON"):
        load_prompts(_prompts_cfg(bad))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "ok"}\n{"turns": [{"content": "a"}, {"content": "b"}]}\n')
    with pytest.raises(DataError, match=r"rows.jsonl line 2: key 'turns'"):
        load_prompts(_prompts_cfg(rows))
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps([{"instruction": "a"}, {"output": "b"}]))
    with pytest.raises(DataError, match=r"list.json item 1: no prompt"):
        load_prompts(_prompts_cfg(lst))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(_prompts_cfg(empty))
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(_prompts_cfg(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="prompts.path is required"):
        load_prompts(OmegaConf.create({"name": "x", "source": "file", "path": None, "limit": None}))


def test_load_prompts_jsonl_with_unicode_line_separator(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"instruction": "a\u2028b\x85c"}, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    assert load_prompts(_prompts_cfg(path))[0].messages[-1]["content"] == "a\u2028b\x85c"


# ------------------------------------------------------------------ output formats
def test_alpaca_eval_outputs_format(tmp_path):
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(ALPACA, indent=2))
    out = generate.run(
        _cfg(
            tmp_path / "run",
            "prompts=local",
            f"prompts.path={src}",
            "prompts.name=alpaca_eval",
            "model_id=my-model",
            "generation.batch_size=2",
        )
    )
    items = json.loads((out / "model_outputs.json").read_text())
    assert isinstance(items, list) and len(items) == len(ALPACA)
    for item, row in zip(items, ALPACA, strict=True):
        assert set(item) == {"instruction", "output", "generator", "dataset"}
        assert item["instruction"] == row["instruction"]  # same text (whitespace too), same order
        assert isinstance(item["output"], str) and item["generator"] == "my-model"
        assert item["dataset"] == row.get("dataset", "alpaca_eval")
    assert any(item["output"] for item in items)  # untied tiny model: not all empty
    settings = json.loads((out / "generation_settings.json").read_text())
    assert settings["model_id"] == "my-model" and settings["model"]["source"] == "tiny"
    assert settings["generation"]["do_sample"] is False
    assert settings["generation"]["max_new_tokens"] == 6
    assert settings["prompts"]["path"] == str(src) and settings["prompts"]["name"] == "alpaca_eval"
    assert settings["seed"] == 0 and settings["run"]["prompts"] == 5
    assert settings["run"]["generated_now"] == 5
    recs = read_jsonl(out / "generations.jsonl")
    assert sorted(r["id"] for r in recs) == ["0", "1", "2", "3", "4"]
    for r in recs:
        assert len(r["outputs"]) == len(r["output_tokens"]) == len(r["ended"]) == 1
        assert 1 <= r["output_tokens"][0] <= 6 and r["prompt_tokens"] > 0


def test_arena_hard_answers_format(tmp_path):
    src = write_jsonl(tmp_path / "question.jsonl", ARENA)
    out = generate.run(
        _cfg(
            tmp_path / "run", "prompts=local", f"prompts.path={src}", "prompts.name=arena-hard-v0.1"
        )
    )
    # model_id from the model: name_or_path, made file-name safe
    answers = read_jsonl(out / "arena_hard" / "tiny-llama.jsonl")
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in ARENA]
    recs = {r["id"]: r for r in read_jsonl(out / "generations.jsonl")}
    for a in answers:
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert isinstance(a["answer_id"], str) and a["answer_id"]
        assert a["model_id"] == "tiny-llama"
        assert isinstance(a["tstamp"], int | float) and not isinstance(a["tstamp"], bool)
        r = recs[a["question_id"]]
        content, token_len = r["outputs"][0], r["output_tokens"][0]
        assert a["choices"] == [
            {"index": 0, "turns": [{"content": content, "token_len": token_len}]}
        ]
        assert isinstance(content, str) and isinstance(token_len, int)
    assert len({a["answer_id"] for a in answers}) == len(answers)
    # The AlpacaEval file is written too: dataset defaults to the prompt set's name.
    items = json.loads((out / "model_outputs.json").read_text())
    assert [i["instruction"] for i in items] == [q["turns"][0]["content"] for q in ARENA]
    assert {i["dataset"] for i in items} == {"arena-hard-v0.1"}


def test_model_id_of_a_training_export(tmp_path):
    final = tmp_path / "outputs" / "refa run:1" / "final"
    final.mkdir(parents=True)
    cfg = OmegaConf.create({"model_id": None, "model": {"name_or_path": f"{final}/"}})
    assert generate.model_id_of(cfg) == "refa_run_1"
    cfg = OmegaConf.create({"model_id": None, "model": {"name_or_path": "org/Model-7B"}})
    assert generate.model_id_of(cfg) == "org_Model-7B"


# ------------------------------------------------------------------ BOS and truncation
def _gen(**kw):
    return OmegaConf.create({"max_prompt_length": 2048, "system_prompt": None, **kw})


PROMPTS = [
    Prompt("a", [{"role": "user", "content": "hi"}]),
    Prompt("b", [{"role": "system", "content": "sys"}, {"role": "user", "content": "q?"}]),
]


def test_encode_prompts_one_bos_when_template_writes_it():
    tok = tiny_tokenizer()
    assert tok.apply_chat_template(PROMPTS[0].messages, tokenize=False).startswith("<s>")
    ids, cut = encode_prompts(tok, PROMPTS, _gen())
    assert cut == 0
    for x, p in zip(ids, PROMPTS, strict=True):
        assert x[0] == tok.bos_token_id and x.count(tok.bos_token_id) == 1
        expected = tok.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
        assert tok.decode(x) == expected and expected.endswith("<|im_start|>assistant\n")


def test_encode_prompts_one_bos_when_tokenizer_adds_it():
    tok = tiny_tokenizer()
    plain, _ = encode_prompts(tok, PROMPTS, _gen())
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    assert tok("a").input_ids[0] == bos  # this tokenizer adds BOS on its own
    ids, _ = encode_prompts(tok, PROMPTS, _gen())
    assert ids == plain
    tok.chat_template = tok.chat_template.replace("{{ bos_token }}", "")  # template writes none
    ids, _ = encode_prompts(tok, PROMPTS, _gen())
    assert ids == plain


def test_encode_prompts_keeps_the_end_of_long_prompts_and_counts_them():
    tok = tiny_tokenizer()
    long = Prompt("l", [{"role": "user", "content": "word " * 40 + "THE END"}])
    full, _ = encode_prompts(tok, [long, PROMPTS[0]], _gen())
    assert len(full[0]) > 30 >= len(full[1])
    ids, cut = encode_prompts(tok, [long, PROMPTS[0]], _gen(max_prompt_length=30))
    assert cut == 1 and len(ids[0]) == 30
    assert ids[0][0] == tok.bos_token_id and ids[0][1:] == full[0][-29:]
    assert tok.decode(ids[0]).endswith("THE END<|im_end|>\n<|im_start|>assistant\n")
    assert ids[1] == full[1]


# ------------------------------------------------------------------ determinism, sampling
def test_greedy_runs_are_identical(tmp_path):
    a = generate.run(_cfg(tmp_path / "a", "prompts.n=6", "generation.batch_size=4"))
    b = generate.run(_cfg(tmp_path / "b", "prompts.n=6", "generation.batch_size=4"))
    ra, rb = read_jsonl(a / "generations.jsonl"), read_jsonl(b / "generations.jsonl")
    assert ra == rb and len(ra) == 6 and any(r["outputs"][0] for r in ra)
    assert (a / "model_outputs.json").read_text() == (b / "model_outputs.json").read_text()
    # answer ids are stable across reruns; only the timestamp differs
    strip = [
        {k: v for k, v in x.items() if k != "tstamp"}
        for x in read_jsonl(a / "arena_hard" / "tiny-llama.jsonl")
    ]
    assert strip == [
        {k: v for k, v in x.items() if k != "tstamp"}
        for x in read_jsonl(b / "arena_hard" / "tiny-llama.jsonl")
    ]


def test_sampling_num_samples(tmp_path):
    common = (
        "prompts.n=4",
        "generation.do_sample=true",
        "generation.num_samples=3",
        "generation.temperature=1.0",
        "generation.batch_size=2",
    )
    out = generate.run(_cfg(tmp_path / "s", *common))
    recs = read_jsonl(out / "generations.jsonl")
    assert len(recs) == 4
    for r in recs:
        assert len(r["outputs"]) == len(r["output_tokens"]) == len(r["ended"]) == 3
    assert any(len(set(r["outputs"])) > 1 for r in recs)  # really sampled
    again = generate.run(_cfg(tmp_path / "s2", *common))
    assert read_jsonl(again / "generations.jsonl") == recs  # seeded per batch
    items = json.loads((out / "model_outputs.json").read_text())
    by_id = {r["id"]: r for r in recs}
    assert [i["output"] for i in items] == [
        by_id[f"heldout-{i:06d}"]["outputs"][0] for i in range(4)
    ]


def test_num_samples_without_sampling_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="num_samples > 1 needs generation.do_sample=true"):
        generate.run(_cfg(tmp_path / "x", "prompts.n=2", "generation.num_samples=2"))


# ------------------------------------------------------------------ resumable results
def test_results_log_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "sub" / "g.jsonl"
    log = ResultsLog(path)
    assert log.records == {} and path.parent.is_dir()
    log.append([{"id": "a", "x": 1}, {"id": "b", "x": "é"}])
    log.append([{"id": "c", "x": [1, 2]}])
    good = path.read_bytes()
    with path.open("ab") as f:
        f.write(b'{"id": "d", "x": ')  # killed mid-write
    again = ResultsLog(path)
    assert again.records == {
        "a": {"id": "a", "x": 1},
        "b": {"id": "b", "x": "é"},
        "c": {"id": "c", "x": [1, 2]},
    }
    assert path.read_bytes() == good  # truncated back to the last complete line
    again.append([{"id": "d", "x": 4}])
    assert list(ResultsLog(path).records) == ["a", "b", "c", "d"]
    # A complete JSON object without its newline is torn too (the write may continue past it).
    with path.open("ab") as f:
        f.write(b'{"id": "e"}')
    assert list(ResultsLog(path).records) == ["a", "b", "c", "d"]
    assert path.read_bytes().endswith(b'"x": 4}\n')


def test_results_log_keeps_records_with_unicode_line_separators(tmp_path):
    path = tmp_path / "g.jsonl"
    recs = [
        {"id": "a", "outputs": ["x\u2028y"]},
        {"id": "b", "outputs": ["z\x85"]},
        {"id": "c", "outputs": ["ok"]},
    ]
    ResultsLog(path).append(recs)
    size = path.stat().st_size
    assert list(ResultsLog(path).records.values()) == recs
    assert path.stat().st_size == size


def _kill_and_resume(tmp_path: Path, lost: int) -> tuple[list[dict], list[dict], int]:
    """Run, drop the last ``lost`` lines of generations.jsonl, rerun in the same dir."""
    common = (
        "prompts.n=8",
        "generation.batch_size=3",
        "generation.do_sample=true",
        "generation.num_samples=2",
        "seed=3",
    )
    out = generate.run(_cfg(tmp_path / "run", *common))
    path = out / "generations.jsonl"
    straight = read_jsonl(path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:-lost]), encoding="utf-8")  # these never landed
    generate.run(_cfg(tmp_path / "run", *common))
    resumed = read_jsonl(path)
    assert len(resumed) == 8 == len({r["id"] for r in resumed})  # every prompt exactly once
    assert {r["id"] for r in resumed} == {r["id"] for r in straight}
    items = json.loads((out / "model_outputs.json").read_text())
    by_id = sorted(straight, key=lambda r: r["id"])  # constraint ids sort in prompt-set order
    assert [i["instruction"] for i in items] == [r["prompt"][-1]["content"] for r in by_id]
    settings = json.loads((out / "generation_settings.json").read_text())
    return straight, resumed, settings["run"]["generated_now"]


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    # Batches of 3 (by prompt length): the file holds lines 0-2, 3-5, 6-7; lose the last two.
    straight, resumed, generated_now = _kill_and_resume(tmp_path, lost=5)
    assert generated_now == 5
    assert resumed == straight  # same samples, and the rerun appended in batch order


def test_resume_after_a_partly_written_batch_equals_uninterrupted_run(tmp_path):
    # Lose the last batch (2 lines) and one line of the batch before: the rerun draws that
    # batch's two missing prompts as a batch of 2 under the seed of the batch of 3.
    straight, resumed, generated_now = _kill_and_resume(tmp_path, lost=3)
    assert generated_now == 3
    assert sorted(resumed, key=lambda r: r["id"]) == sorted(straight, key=lambda r: r["id"])


def test_changed_settings_in_the_same_dir_are_refused(tmp_path):
    generate.run(_cfg(tmp_path / "run", "prompts.n=2"))
    for change in (
        "generation.max_new_tokens=7",
        "prompts.n=3",
        "seed=1",
        "generation.do_sample=true",
    ):
        with pytest.raises(ValueError, match="other settings"):
            generate.run(_cfg(tmp_path / "run", "prompts.n=2", change))
    # model_id only names the outputs: rerunning under another name is fine (nothing to do)
    out = generate.run(_cfg(tmp_path / "run", "prompts.n=2", "model_id=renamed"))
    assert json.loads((out / "generation_settings.json").read_text())["run"]["generated_now"] == 0
    assert (out / "arena_hard" / "renamed.jsonl").is_file()


@pytest.mark.parametrize("change", ["model.dtype=bfloat16", "model.tiny.hidden_size=32"])
def test_changed_model_settings_in_the_same_dir_are_refused(tmp_path, change):
    out = tmp_path / "run"
    out.mkdir()
    cfg = typed(_cfg(out, "prompts.n=2"), GenerateConfig)
    check_settings(out / "generation_settings.json", settings_of(cfg, "m"))
    other = typed(_cfg(out, "prompts.n=2", change), GenerateConfig)
    with pytest.raises(ValueError, match="other settings"):
        check_settings(out / "generation_settings.json", settings_of(other, "m"))
