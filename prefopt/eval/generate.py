"""Generate responses for a prompt set and write benchmark submission files.

    python -m prefopt.eval.generate prompts=alpaca_eval model=checkpoint \\
        model.name_or_path=outputs/refa_dynamic/<run>/final            # AlpacaEval 2 (805)
    python -m prefopt.eval.generate prompts=arena_hard model=checkpoint model.name_or_path=...
    python -m prefopt.eval.generate prompts=local prompts.path=my_prompts.jsonl
    python -m prefopt.eval.generate prompts=constraints                      # offline, SmolLM2

Prompts are formatted with the model's chat template exactly as in training (one BOS), decoded
greedily by default, and batched by prompt length. Each run directory gets:

- ``generations.jsonl``: one record per prompt (all samples, token counts, whether each ended
  with EOS), appended batch by batch: a killed run resumes where it stopped, no prompt twice;
- ``model_outputs.json``: AlpacaEval's format (instruction, output, generator, dataset);
- ``arena_hard/<model_id>.jsonl``: Arena-Hard-Auto v0.1's model_answer format;
- ``generation_settings.json``: model, decoding settings, prompt set, counts, throughput.

Prompt sets are read and encoded in ``prefopt.eval.prompts``; the two benchmark files are written
by ``prefopt.eval.submissions``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefopt.checks import typed
from prefopt.config import GenerateConfig, GenerationConfig
from prefopt.errors import report_user_errors
from prefopt.eval.prompts import Prompt, Record, encode_prompts, load_prompts
from prefopt.eval.submissions import write_submissions
from prefopt.model.load import DTYPES, load_model, load_tokenizer
from prefopt.model.sampling import decoding_config, eos_ids, generate_ids
from prefopt.train.summary import git_commit

log = logging.getLogger("prefopt")


# ------------------------------------------------------------------ resumable results
# ------------------------------------------------------------------ resumable results
class ResultsLog:
    """An append-only JSONL of records keyed by ``id``. Each batch is one write + fsync, so a
    killed run loses at most the batch in flight; a torn last line is dropped on reopening."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, Record] = {}
        if path.exists():
            good = 0
            # Split on b"\n" only: str.splitlines() also breaks at U+2028 and friends, which
            # json.dumps(ensure_ascii=False) leaves unescaped inside model outputs.
            for line in path.read_bytes().split(b"\n")[:-1]:
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break
                self.records[rec["id"]] = rec
                good += len(line) + 1
            if good != path.stat().st_size:
                log.warning("%s: dropping a partly written last line", path)
                with path.open("r+b") as f:
                    f.truncate(good)
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, records: list[Record]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        self.records.update((r["id"], r) for r in records)


def check_settings(path: Path, settings: dict[str, Any]) -> None:
    """Resuming with other settings would mix two runs in one file: refuse."""
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("key") != settings["key"]:
            raise ValueError(
                f"{path.parent} holds outputs made with other settings "
                f"({old.get('key')} vs {settings['key']}); use a new output "
                "directory"
            )
    else:
        path.write_text(json.dumps(settings, indent=2))


def ordered(prompts: list[Prompt], results: ResultsLog) -> list[Record]:
    return [results.records[p.id] for p in prompts]


# ------------------------------------------------------------------ generation
def generate_all(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    gen: GenerationConfig,
    results: ResultsLog,
    seed: int,
    score: Callable[[list[Prompt], list[Record]], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate for every prompt not yet in ``results``; return counts and throughput.

    Batches are fixed by the prompt set (sorted by length) and seeded by their index, so a
    resumed run draws the same samples for the batches it still has to do. ``score`` may add
    fields (scores) to a batch's records before they are written."""
    ids, truncated = encode_prompts(tok, prompts, gen)
    config = decoding_config(
        max_new_tokens=gen.max_new_tokens,
        do_sample=gen.do_sample,
        temperature=gen.temperature,
        top_p=gen.top_p,
        top_k=gen.top_k,
        num_samples=gen.num_samples,
        eos_ids=eos_ids(tok, model),
        pad_id=tok.pad_token_id,
    )
    eos = set(config.eos_token_id)
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    todo = [i for i in order if prompts[i].id not in results.records]
    bar = tqdm(
        total=len(prompts),
        initial=len(prompts) - len(todo),
        desc="generate",
        dynamic_ncols=True,
        disable=not progress,
    )
    new_tokens, t0 = 0, time.perf_counter()
    for b in range(0, len(order), gen.batch_size):
        chunk = order[b : b + gen.batch_size]
        batch = [i for i in chunk if prompts[i].id not in results.records]
        if not batch:
            continue
        # The whole batch, even when part of it was written: the samples must not depend on
        # where an interrupted run stopped.
        torch.manual_seed(seed * 1_000_003 + b)
        outs = dict(zip(chunk, generate_ids(model, [ids[i] for i in chunk], config), strict=True))
        records = []
        for i in batch:
            p, rows = prompts[i], outs[i]
            records.append(
                {
                    "id": p.id,
                    "prompt": p.messages,
                    "meta": p.meta,
                    "prompt_tokens": len(ids[i]),
                    "outputs": [tok.decode(r, skip_special_tokens=True).strip() for r in rows],
                    "output_tokens": [len(r) for r in rows],
                    "ended": [bool(r) and r[-1] in eos for r in rows],
                }
            )
            new_tokens += sum(len(r) for r in rows)
        if score is not None:
            score([prompts[i] for i in batch], records)
        results.append(records)
        bar.update(len(batch))
    bar.close()
    dt = time.perf_counter() - t0
    return {
        "prompts": len(prompts),
        "generated_now": len(todo),
        "truncated_prompts": truncated,
        "new_tokens": new_tokens,
        "seconds": round(dt, 2),
        "tokens_per_s": round(new_tokens / dt, 1) if dt > 0 else None,
    }


# ------------------------------------------------------------------ the run
def model_id_of(cfg: GenerateConfig) -> str:
    if cfg.model_id:
        return cfg.model_id
    path = cfg.model.name_or_path.rstrip("/")
    if os.path.isdir(path) and Path(path).name == "final":  # a training run's export
        path = str(Path(path).parent)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).name if os.path.isdir(path) else path)


def inference_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def load_for_inference(cfg: GenerateConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    device = inference_device(cfg.device)
    tok = load_tokenizer(cfg.model, cfg.cache_dir)
    model = load_model(cfg.model, cfg.cache_dir, tok, cfg.seed).to(device)
    if cfg.dtype:
        model = model.to(DTYPES[cfg.dtype])
    return model.eval(), tok


def settings_of(cfg: GenerateConfig, model_id: str) -> dict[str, Any]:
    gen = dataclasses.asdict(cfg.generation)
    prompts = dataclasses.asdict(cfg.prompts)
    model = dataclasses.asdict(cfg.model)
    model.pop("gradient_checkpointing", None)
    key = json.dumps([model, cfg.dtype, gen, prompts, cfg.seed], sort_keys=True)
    return {
        "model_id": model_id,
        "model": dataclasses.asdict(cfg.model),
        "dtype": cfg.dtype,
        "generation": gen,
        "prompts": prompts,
        "seed": cfg.seed,
        "commit": git_commit(),
        "key": key,
    }


def run(composed: DictConfig) -> Path:
    """Generate (or resume) into ``out_dir``; write the submission files; return the dir."""
    cfg = typed(composed, GenerateConfig)  # the typed config from here on
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_id = model_id_of(cfg)
    prompts = load_prompts(cfg.prompts)
    settings = settings_of(cfg, model_id)
    check_settings(out / "generation_settings.json", settings)
    model, tok = load_for_inference(cfg)
    results = ResultsLog(out / "generations.jsonl")
    stats = generate_all(model, tok, prompts, cfg.generation, results, cfg.seed)
    records = ordered(prompts, results)
    arena = write_submissions(out, records, model_id, cfg.prompts.name)
    settings["run"] = stats
    (out / "generation_settings.json").write_text(json.dumps(settings, indent=2))
    log.info("%d prompts -> %s (%s)", len(prompts), out, stats)
    print(f"wrote {out / 'model_outputs.json'} and {arena}", flush=True)
    return out


@hydra.main(config_path="../../conf", config_name="generate", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
