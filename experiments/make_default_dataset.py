"""Remake prefopt's embedded default dataset from SmolLM2-135M-Instruct's own samples.

    python experiments/make_default_dataset.py [--n-train 400] [--n-eval 64] [--seed 0] \\
        [--out-dir prefopt/assets] [--work-dir outputs/default_dataset] [--device cpu]

Two ``prefopt.eval.datagen`` runs (the command-line tool, composed here with its own config): the
offline constraint benchmark's train and held-out tasks, 4 samples per prompt at temperature 0.8
/ top-p 0.95, each scored by the benchmark's verifier; groups whose 4 scores are all equal or
that have fewer than 2 non-empty responses are dropped and counted. The runs resume from
``--work-dir`` when interrupted. Sampling is seeded per batch, so the same machine, torch version
and seed give the same files.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from hydra import compose, initialize_config_dir

from prefopt.eval import datagen

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "prefopt" / "assets")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "default_dataset")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2_135m")
    args = ap.parse_args(argv)
    summaries = {}
    for name, split, n in (("train", "train", args.n_train), ("eval", "heldout", args.n_eval)):
        work = args.work_dir / name
        overrides = [
            f"model={args.model}",
            f"prompts.split={split}",
            f"prompts.n={n}",
            f"prompts.seed={args.seed}",
            f"prompts.name=constraints-{split}",
            f"seed={args.seed}",
            f"device={args.device}",
            f"out_dir={work}",
            f"out_file={work / 'dataset.jsonl'}",
        ]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("datagen", overrides=overrides)
        summaries[name] = datagen.run(cfg)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "dataset.jsonl", args.out_dir / f"default_{name}.jsonl")
    print(json.dumps(summaries, indent=2))


if __name__ == "__main__":
    main()
