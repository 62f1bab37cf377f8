"""TRL's side of ``bench_throughput.py``: CPOTrainer (loss_type=simpo) and DPOTrainer (with a
reference model) on the same token ids, with their best settings that work here.

- per-device batch: every pair of the step at once (``--trl-micro-pairs``; no accumulation);
- padding-free: CPOTrainer has none, and TRL 1.16's DPOTrainer disables ``padding_free`` after
  a refactor (it warns and pads), so both pad each micro-batch to its longest sequence;
- precision: bf16 autocast over fp32 weights on GPU (``bf16=True``), fp32 on CPU;
- Liger kernels (``use_liger_kernel``) when liger-kernel is installed, on GPU only.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile

import torch
from bench_throughput import LENGTHS, Run, build_model, fresh, result, stamp
from datasets import Dataset
from transformers import TrainerCallback


def _rows(groups) -> dict:
    return {
        "prompt_ids": [g.prompt_ids for g in groups],
        "chosen_ids": [g.response_ids[0] for g in groups],
        "rejected_ids": [g.response_ids[1] for g in groups],
    }


class _StepEnds(TrainerCallback):
    def __init__(self, device: str) -> None:
        self.device, self.ends = device, []

    def on_train_begin(self, *a, **kw) -> None:
        self.ends.append(stamp(self.device))

    def on_step_end(self, *a, **kw) -> None:
        self.ends.append(stamp(self.device))


def run_trl(args, run: Run, groups, tok, peak: float) -> dict:
    G, m = args.pairs_per_step, args.trl_micro_pairs
    n = (args.warmup + args.steps) * G
    liger = args.device == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    while True:  # the largest per-device batch that fits: halve on out-of-memory
        fresh(args.device)
        model = build_model(args, "sdpa", tok, run.checkpointing)  # the same initial weights
        n_params = sum(p.numel() for p in model.parameters())
        timer = _StepEnds(args.device)
        try:
            trainer = _train(args, run, model, m, liger, groups[:n], tok, timer)
            break
        except torch.OutOfMemoryError:
            if m == 1:
                raise
            m //= 2
            del model
    # TRL pads each micro-batch of m pairs to its longest sequence, chosen and rejected alike.
    positions = 0
    for start in range(args.warmup * G, n, m):
        chunk = groups[start : start + m]
        width = max(len(g.prompt_ids) + max(map(len, g.response_ids[:2])) for g in chunk)
        positions += 2 * len(chunk) * width
    name = f"TRL {type(trainer).__name__} {run.loss}" + (" +ckpt" if run.checkpointing else "")
    note = f"per-device batch {m} pairs, padded, liger {liger}"
    return result(
        args,
        name,
        "sdpa",
        run,
        groups,
        timer.ends,
        n_params,
        positions,
        peak,
        micro_batches=G // m,
        note=note,
    )


def _train(args, run: Run, model, m: int, liger: bool, groups, tok, timer):
    G = args.pairs_per_step
    common = dict(
        per_device_train_batch_size=m,
        gradient_accumulation_steps=G // m,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=args.device == "cuda",
        use_cpu=args.device == "cpu",
        max_length=LENGTHS[args.lengths][-1],
        gradient_checkpointing=run.checkpointing,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=args.seed,
        train_sampling_strategy="sequential",  # step i on the same pairs as prefopt's
        use_liger_kernel=liger,
    )
    with tempfile.TemporaryDirectory() as out_dir:
        make = _cpo if run.loss == "simpo" else _dpo
        trainer = make(model, out_dir, common, groups, tok, timer)
        trainer.train()
    return trainer


def _cpo(model, out_dir, common, groups, tok, timer):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    class IdsCPOTrainer(CPOTrainer):
        """Takes token ids as they are (BOS and EOS included), so both systems see one data."""

        def tokenize_row(self, feature, model=None) -> dict:
            p = feature["prompt_ids"]
            out = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
            for side in ("chosen", "rejected"):
                seq = p + feature[f"{side}_ids"]
                out |= {
                    f"{side}_input_ids": seq,
                    f"{side}_attention_mask": [1] * len(seq),
                    f"{side}_labels": [-100] * len(p) + feature[f"{side}_ids"],
                }
            return out

    # cpo_alpha 0: pure SimPO; gamma 1.0 absolute, as prefopt's simpo defaults
    config = CPOConfig(
        output_dir=out_dir, loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=1.0, **common
    )
    return IdsCPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict(_rows(groups)),
        processing_class=tok,
        callbacks=[timer],
    )


def _dpo(model, out_dir, common, groups, tok, timer):
    """DPOTrainer reads ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` as they are."""
    from trl import DPOConfig, DPOTrainer

    class IdsDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already token ids in the collator's columns

    config = DPOConfig(output_dir=out_dir, loss_type="sigmoid", beta=0.1, **common)
    return IdsDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model).eval(),
        args=config,
        train_dataset=Dataset.from_dict(_rows(groups)),
        processing_class=tok,
        callbacks=[timer],
    )
