# pytest tests/test_reliability.py -q
"""Bad input and damaged run state (issue 16): each case gives one message naming file/line/key
or key/value, or the documented skip with a count; damaged checkpoints fall back to the previous
complete one with bit-identical final weights; no traceback on the CLI without PREFOPT_DEBUG."""

from __future__ import annotations

import errno
import gzip
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, arithmetic_rows, checkpoint_weights, write_jsonl
from hydra import compose, initialize_config_dir

from prefopt.checks import validate_config
from prefopt.data.loading import load_tokenized, make_views
from prefopt.data.schemas import ParseOptions
from prefopt.data.tokenize import TokenizeOptions, Tokenizer
from prefopt.errors import CheckpointError, ConfigError, DataError
from prefopt.train.checkpoint import (
    TrainState,
    list_checkpoints,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)
from prefopt.train.logger import JsonlLogger

ROW = {"prompt": "What is 2 + 2?", "responses": ["4", "5"], "scores": [1.0, 0.0]}


def _load(path: Path, tok, bad_rows: str = "error", cache: Path | None = None):
    tokenizer = Tokenizer(tok, TokenizeOptions())
    return load_tokenized(
        str(path),
        "train",
        "canonical",
        ParseOptions(),
        tokenizer,
        str(cache) if cache else None,
        bad_rows,
    )


def _lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


GOOD = json.dumps(ROW).encode()


# ---- data: every unreadable line is a bad row: named with its line, skippable and counted ----


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            GOOD[:-7],
            r"line 3: invalid JSON \(Expecting .* the line ends early",
        ),  # truncated last line
        (GOOD.replace(b"2 + 2", b"2 \x01 2"), r"line 3: invalid JSON \(Invalid control char"),
        (b"[1, 2]", r"line 3: expected a JSON object, got list"),
        (GOOD.replace(b"2 + 2", b"2 \xff 2"), r"line 3: invalid UTF-8 \(byte 0xff at column"),
    ],
    ids=["truncated", "control_char", "array_row", "utf8"],
)
def test_unreadable_lines_name_the_line_and_skip_with_a_count(tmp_path, tok, line, message):
    path = _lines(tmp_path / "d.jsonl", [GOOD, GOOD, line])
    with pytest.raises(DataError, match=f"d\\.jsonl {message}"):
        _load(path, tok)
    data, counts = _load(path, tok, "skip")
    assert len(data) == 2 and counts["skipped_bad_rows"] == 1


def test_huge_integer_and_float32_overflowing_scores_are_refused_at_load(tmp_path, tok):
    big = json.dumps({**ROW, "scores": [1, 0]}).replace("[1, 0]", f"[{'9' * 400}, 0]")
    path = _lines(tmp_path / "d.jsonl", [GOOD, big.encode()])
    with pytest.raises(DataError, match=r"line 2: key 'scores'\[0\]: a 400-digit integer"):
        _load(path, tok)
    write_jsonl(tmp_path / "d.jsonl", [ROW, {**ROW, "scores": [1e39, 0.0]}])
    with pytest.raises(
        DataError, match=r"line 2: key 'scores'\[0\]: score 1e\+39 is inf in float32"
    ):
        _load(path, tok)
    write_jsonl(tmp_path / "d.jsonl", [{**ROW, "scores": [3e38, 0.0]}])  # finite in float32
    assert _load(path, tok)[0]["scores"] == [[3e38, 0.0]]


def test_gzip_jsonl_and_array_json_are_read_like_jsonl(tmp_path, tok):
    rows = arithmetic_rows(3, seed=0)
    plain, _ = _load(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))  # a common export
    for name in ("d.jsonl.gz", "a.json"):
        data, _ = _load(tmp_path / name, tok)
        assert data["response_ids"] == plain["response_ids"], name


def test_array_json_errors_name_the_item_and_its_line(tmp_path, tok):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([ROW, {**ROW, "scores": [1.0]}], indent=2))
    with pytest.raises(DataError, match=r"a\.json item 1 \(line 13\): key 'scores'"):
        _load(path, tok)
    path.write_text(json.dumps([ROW, ROW], indent=2)[:-20])  # truncated export
    with pytest.raises(DataError, match=r"item 1 .*truncated file"):
        _load(path, tok)
    data, counts = _load(path, tok, "skip")
    assert len(data) == 1 and counts["skipped_bad_rows"] == 1


def test_directory_missing_path_and_corrupt_parquet_are_named(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [ROW])
    with pytest.raises(DataError, match=r"is a directory, not a data file; it holds \['train"):
        _load(tmp_path, tok)
    with pytest.raises(DataError, match=r"nope\.jsonl does not exist"):
        _load(tmp_path / "nope.jsonl", tok)
    (tmp_path / "x.parquet").write_bytes(b"PAR1" + os.urandom(200))
    with pytest.raises(DataError, match=r"x\.parquet: not a readable parquet file"):
        _load(tmp_path / "x.parquet", tok)
    (tmp_path / "x.jsonl.zst").write_bytes(b"zz")
    with pytest.raises(DataError, match=r"unknown file format '\.zst'"):
        _load(tmp_path / "x.jsonl.zst", tok)


def test_eos_only_response_is_a_bad_row(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [ROW, {**ROW, "responses": ["4", tok.eos_token]}])
    with pytest.raises(DataError, match=r"line 2: key 'responses'\[1\]: response is only the EOS"):
        _load(path, tok)
    assert _load(path, tok, "skip")[1]["skipped_bad_rows"] == 1


def test_splits_without_a_preference_are_refused_before_any_model(tmp_path, tok):
    tied = [{**ROW, "scores": [2.0, 2.0]}] * 3
    data, _ = _load(write_jsonl(tmp_path / "d.jsonl", tied), tok)
    with pytest.raises(
        DataError,
        match=r"d\.jsonl: no usable pair: all 3 groups have equal "
        r"scores \(dataset.pairs=all_pairs\)",
    ):
        make_views(data, "all_pairs")
    with pytest.raises(DataError, match="no usable group"):
        make_views(data, None)
    same = [{**ROW, "responses": ["4", "4"]}] * 3  # chosen == rejected in every row
    with pytest.raises(DataError, match=r"no usable rows.*'skipped_identical_responses': 3"):
        _load(write_jsonl(tmp_path / "d.jsonl", same), tok)


def test_damaged_tokenized_cache_is_named_and_rebuilt(tmp_path, tok, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(4, seed=0))
    first, _ = _load(path, tok, cache=tmp_path / "cache")
    (entry,) = (tmp_path / "cache" / "tokenized").iterdir()
    (arrow,) = entry.rglob("*.arrow")
    raw = bytearray(arrow.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 8] = b"\xff" * 8
    arrow.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        again, _ = _load(path, tok, cache=tmp_path / "cache")
    assert f"tokenized cache {entry} is damaged" in caplog.text
    assert again["response_ids"] == first["response_ids"]
    assert [p.name for p in (tmp_path / "cache" / "tokenized").iterdir()] == [entry.name]


def test_cache_temp_dirs_are_unique_across_hosts_and_processes(tmp_path, tok, monkeypatch):
    import prefopt.data.loading as loading

    seen: list[str] = []

    def spy(tmp: Path, target: Path) -> None:
        seen.append(tmp.name)
        shutil.rmtree(tmp)

    monkeypatch.setattr(loading, "publish_dir", spy)
    monkeypatch.setattr(loading.socket, "gethostname", lambda: "node17")
    path = write_jsonl(tmp_path / "d.jsonl", [ROW])
    for _ in range(2):
        with pytest.raises(FileNotFoundError):  # the spy published nothing to reload
            _load(path, tok, cache=tmp_path / "cache")
    assert all(f"-node17-{os.getpid()}-" in n for n in seen) and seen[0] != seen[1]


# ---- config: unknown keys even with +, ranges and choices, loss name vs schema ----


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=["model=tiny", "trainer=debug", "run_dir=/r", "cache_dir=/c", *overrides],
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+foo=1"], r"unknown key foo \(TrainConfig"),
        (["+loss.betta=0.1"], r"unknown key loss.betta .*"),
        (["+trainer.max_stepz=3"], r"unknown key trainer.max_stepz"),
        (["+model.tiny.hiden_size=3"], r"unknown key model.tiny.hiden_size"),
        (["trainer.max_steps=-1"], r"trainer.max_steps=-1: must be >= 0"),
        (["trainer.epochs=-1"], r"trainer.epochs=-1.0: must be > 0"),
        (["trainer.global_batch_groups=0"], r"trainer.global_batch_groups=0: must be >= 1"),
        (["trainer.micro_batch_groups=0"], r"trainer.micro_batch_groups=0: must be >= 1"),
        (["trainer.log_every=0"], r"trainer.log_every=0: must be >= 1"),
        (["trainer.eval_every=-2"], r"trainer.eval_every=-2: must be >= 0"),
        (["trainer.save_every=-1"], r"trainer.save_every=-1"),
        (["trainer.max_grad_norm=-1"], r"trainer.max_grad_norm=-1.0: must be > 0"),
        (["trainer.warmup_ratio=1.5"], r"trainer.warmup_ratio=1.5: must be in \[0, 1\]"),
        (["trainer.schedule=step"], r"trainer.schedule='step': expected one of"),
        (["optimizer.betas=[0.9]"], r"optimizer.betas=\[0.9\]: must be two numbers"),
        (["optimizer.betas=[0.9,1.5]"], r"optimizer.betas=\[0.9, 1.5\]"),
        (["optimizer.lr=-1e-3"], r"optimizer.lr=-0.001: must be > 0"),
        (
            ["dataset=local", "dataset.path=x.jsonl", "dataset.eval_size=0"],
            r"dataset.eval_size=0: with no dataset.eval_path",
        ),
        (["dataset.max_prompt_length=200"], r"dataset.max_prompt_length=200 must be below"),
        (["dataset.bad_rows=ignore"], r"dataset.bad_rows='ignore'"),
        (["loss=dpo", "loss.name=simpo"], r"loss.name='simpo', but the loss config is 'dpo'"),
        (["loss.name=nope"], r"loss.name='nope' is not a registered loss"),
    ],
)
def test_config_mistakes_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_compose(*overrides))


def test_typo_suggests_the_close_key():
    with pytest.raises(ConfigError) as e:
        validate_config(_compose("+loss.betta=0.1"))
    assert e.value.fix == "did you mean loss.beta?"


def test_every_experiment_and_the_other_clis_pass_the_checks():
    """No false alarm on shipped configs: experiments of four families (they set most groups and
    many values; tests/test_configs.py composes every file) and the other CLIs' configs."""
    from prefopt.checks import check_loss_schema, check_ranges, check_schema

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for name in ("simpo_llama3_base", "alpha_dpo_gemma2_9b_it", "refa_mistral7b_base", "spo"):
            experiment = [f"experiment={name}"] if name != "spo" else ["loss=spo", "trainer=gpu"]
            cfg = compose("train", overrides=[*experiment, "run_dir=/r", "cache_dir=/c"])
            check_schema(cfg)
            check_loss_schema(cfg.loss)
            check_ranges(cfg)
        for name in ("generate", "evaluate", "datagen"):
            check_schema(compose(name, overrides=["out_dir=/o", "cache_dir=/c"]))


# ---- the CLI: one block on stderr, exit 2, no traceback unless PREFOPT_DEBUG=1 ----


def _cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("PREFOPT_DEBUG", None)
    cmd = [
        sys.executable,
        "-m",
        "prefopt.train",
        "model=tiny",
        "trainer=debug",
        f"hydra.run.dir={tmp_path / 'run'}",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_config_error_is_one_block_without_traceback(tmp_path):
    proc = _cli(tmp_path, "+trainer.max_stepz=3")
    assert proc.returncode == 2
    assert "prefopt config error: unknown key trainer.max_stepz" in proc.stderr
    assert "did you mean trainer.max_steps?" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("switch", ["PREFOPT_DEBUG", "HYDRA_FULL_ERROR"])
def test_debug_switch_shows_the_stack_and_bugs_keep_theirs(monkeypatch, capsys, switch):
    from prefopt.errors import report_user_errors

    @report_user_errors
    def main(error: Exception) -> None:
        raise error

    monkeypatch.delenv("PREFOPT_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as e:
        main(DataError("d.jsonl line 6: invalid UTF-8", fix="re-encode the file as UTF-8"))
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[:2] == [
        "prefopt data error: d.jsonl line 6: invalid UTF-8",
        "  to fix: re-encode the file as UTF-8",
    ]
    with pytest.raises(ZeroDivisionError):  # an internal bug is not a user error
        main(ZeroDivisionError("bug"))
    monkeypatch.setenv(switch, "1")
    with pytest.raises(DataError):  # re-raised: Hydra / Python print the full stack
        main(DataError("d.jsonl line 6: invalid UTF-8"))


def test_cli_data_error_names_file_and_line_without_traceback(tmp_path):
    good = json.dumps(ROW).encode()
    path = _lines(tmp_path / "d.jsonl", [good] * 5 + [good.replace(b"2 + 2", b"2 \xff 2")])
    proc = _cli(tmp_path, f"dataset.path={path}", f"dataset.eval_path={path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"prefopt data error: {path} line 6: invalid UTF-8" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_hydra_composition_errors_stay_short(tmp_path):
    proc = _cli(tmp_path, "trainer.max_stepz=3")  # without +: Hydra's own message
    assert proc.returncode == 1
    assert "Could not override 'trainer.max_stepz'" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- run state: checkpoints verify, resume falls back, disk full is named, logs once ----


def _train_cfg(run_dir: Path, data: tuple[Path, Path], *overrides: str):
    return _compose(
        f"run_dir={run_dir}",
        f"cache_dir={run_dir.parent / 'cache'}",
        f"dataset.path={data[0]}",
        f"dataset.eval_path={data[1]}",
        "loss=simpo",
        "trainer.max_steps=4",
        "optimizer.lr=1e-3",
        *overrides,
    )


def _train_steps(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["train/loss"]) for m in lines if "train/loss" in m]


def _flip(path: Path, n: int = 64) -> None:
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + n] = bytes(b ^ 0xFF for b in raw[mid : mid + n])
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """An uninterrupted 4-step run, and one stopped at step 3 with checkpoints at 1, 2, 3."""
    from prefopt.train.loop import run

    root = tmp_path_factory.mktemp("ckpt")
    data = (
        write_jsonl(root / "t.jsonl", arithmetic_rows(24, seed=0)),
        write_jsonl(root / "e.jsonl", arithmetic_rows(8, seed=1)),
    )
    run(_train_cfg(root / "straight", data))
    stopped = root / "stopped"
    run(
        _train_cfg(
            stopped, data, "trainer.save_every=1", "trainer.keep_last=3", "trainer.stop_at_step=3"
        )
    )
    return root, data, checkpoint_weights(root / "straight", 4), _train_steps(root / "straight")


def _shard(step_dir: Path) -> Path:
    return next(step_dir.glob("*.distcp"))


DAMAGE = {
    # step_4: an empty dir (a save killed before writing); step_3: 64 flipped bytes in a shard;
    # step_2: a garbage train_state.pt -> resume from step 1
    "flipped": lambda c: (
        (c / "step_000004").mkdir(),
        _flip(_shard(c / "step_000003")),
        (c / "step_000002" / "train_state.pt").write_bytes(b"garbage"),
    ),
    # step_3: a truncated shard; step_2: an empty train_state.pt -> resume from step 1
    "truncated": lambda c: (
        os.truncate(_shard(c / "step_000003"), 100),
        (c / "step_000002" / "train_state.pt").write_bytes(b""),
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoints_fall_back_to_the_last_good_one_bit_identically(
    interrupted, tmp_path, caplog, damage
):
    from prefopt.train.loop import run

    root, data, want, want_steps = interrupted
    run_dir = tmp_path / "run"
    shutil.copytree(root / "stopped", run_dir)
    DAMAGE[damage](run_dir / "checkpoints")
    with caplog.at_level(logging.INFO):
        run(_train_cfg(run_dir, data, "trainer.save_every=1", "trainer.keep_last=3"))
    for skipped in ["step_000004"] * (damage == "flipped") + ["step_000003", "step_000002"]:
        assert f"skipping checkpoint {run_dir / 'checkpoints' / skipped}" in caplog.text
    assert "resumed from" in caplog.text and "step_000001 at step 1" in caplog.text
    torch.testing.assert_close(checkpoint_weights(run_dir, 4), want, rtol=0, atol=0)
    kept = list_checkpoints(str(run_dir))  # the damaged ones were replaced as training passed them
    assert [p.name for p in kept] == ["step_000002", "step_000003", "step_000004"]
    assert all(verify_checkpoint(p) is None for p in kept)
    steps = _train_steps(run_dir)
    assert steps == want_steps and [s for s, _ in steps] == [1, 2, 3, 4]  # each step once
    assert all(math.isfinite(loss) for _, loss in steps)


def test_no_verifying_checkpoint_fails_naming_each(interrupted, tmp_path):
    root, *_ = interrupted
    shutil.copytree(root / "stopped", tmp_path / "run")
    for step_dir in list_checkpoints(str(tmp_path / "run")):
        (step_dir / "manifest.json").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"no checkpoint in .* verifies \(step_000003: no "
        r"manifest.json.*step_000001: no manifest",
    ):
        resolve_resume("auto", str(tmp_path / "run"))
    with pytest.raises(CheckpointError, match=r"trainer.resume=.*step_000002: cannot resume"):
        resolve_resume(str(tmp_path / "run" / "checkpoints" / "step_000002"), "unused")


def _small_save(run_dir: Path, step: int, keep_last: int = 2) -> Path:
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    return save_checkpoint(str(run_dir), model, optimizer, TrainState(step=step), keep_last)


def test_a_save_after_an_older_resume_removes_the_newer_timeline(tmp_path):
    for step in (1, 2, 3):
        _small_save(tmp_path, step, keep_last=3)
    _small_save(tmp_path, 2, keep_last=1)  # resumed from step 1 (2 and 3 were damaged, say)
    assert [p.name for p in list_checkpoints(str(tmp_path))] == ["step_000002"]


def test_disk_full_names_path_and_bytes_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as dcp_fs

    _small_save(tmp_path, 1)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_fs, "_write_item", no_space)  # DCP's shard writer
    with pytest.raises(CheckpointError) as e:
        _small_save(tmp_path, 2)
    # Linear(64, 64): 4160 fp32 weights, AdamW's two moments (get_state_dict creates them) and
    # two fp32 step counters; plus 1 MiB for metadata and train_state.pt
    needed = 3 * 4160 * 4 + 2 * 4 + (1 << 20)
    assert f"no space left on the device of {tmp_path / 'checkpoints'}" in str(e.value)
    assert f"step_000002: it needs about {needed} bytes" in str(e.value)
    assert "training resumes from step_000001" in e.value.fix
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]
    assert resolve_resume("auto", str(tmp_path)).name == "step_000001"


def test_torch_save_full_disk_without_errno_is_named_by_free_space(tmp_path, monkeypatch):
    import prefopt.train.checkpoint as ckpt

    def torn(*args, **kwargs):  # what torch.save raises when the disk fills mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(ckpt.torch, "save", torn)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(9, 9, 512))
    with pytest.raises(CheckpointError, match=r"no space left .* 512 bytes are free"):
        _small_save(tmp_path, 1)
    assert list_checkpoints(str(tmp_path)) == []


def test_metrics_of_steps_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in range(6))
        + '{"step": 6, "tra'
    )
    logger = JsonlLogger(path)
    logger.log({"train/loss": 2.0}, step=3)  # resumed from the checkpoint at step 2
    logger.close()
    assert [
        (m["step"], m["train/loss"]) for m in map(json.loads, path.read_text().splitlines())
    ] == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 2.0)]


def test_wandb_resumes_the_same_run(tmp_path, monkeypatch):
    import wandb
    from omegaconf import OmegaConf

    from prefopt.config import LoggerConfig
    from prefopt.train.logger import WandbLogger

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw))
    cfg = OmegaConf.structured(LoggerConfig(kind="wandb", mode="offline"))
    for _ in range(2):
        WandbLogger(cfg, str(tmp_path), {})
    assert calls[0]["id"] == calls[1]["id"] and calls[0]["resume"] == "allow"
