"""Write (or check) prefopt/assets/model_configs/: the architecture of every Hub model a recipe or
experiment names, so that the memory plan and the dry run's plan run without network.

    python experiments/model_configs.py            # list the ids and whether each is shipped
    python experiments/model_configs.py --write    # needs the Hub: refetch every file
    python experiments/model_configs.py --check    # needs the Hub: compare the shipped files

Each file keeps the shape keys of the model's ``config.json`` (SHAPE_KEYS) at its default revision,
``_source`` (where they came from) and ``_parameters``: the parameter count the Hub reports for the
repository's safetensors files (``HfApi().model_info(id).safetensors.total``), an independent
check that the shapes are right: tests/test_offline.py builds each architecture on the meta device
and compares its count with it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefopt.model.load import SHIPPED_CONFIGS  # noqa: E402

SHAPE_KEYS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "rms_norm_eps",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "hidden_act",
    "hidden_activation",
    "tie_word_embeddings",
)


def recipe_hub_ids() -> dict[str, list[str]]:
    """Hub model id -> the model and experiment options that train it (composed, as the CLI)."""
    from hydra import compose, initialize_config_dir

    import prefopt.config  # noqa: F401  (schemas)
    import prefopt.losses  # noqa: F401

    conf = ROOT / "conf"
    ids: dict[str, list[str]] = {}
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        options = [f"model={p.stem}" for p in sorted((conf / "model").glob("*.yaml"))]
        options += [f"experiment={p.stem}" for p in sorted((conf / "experiment").glob("*.yaml"))]
        for option in options:
            if option == "model=checkpoint":  # a local directory the user names
                continue
            model = compose("train", overrides=[option, "run_dir=/x"]).model
            if model.source == "hub":
                ids.setdefault(model.name_or_path, []).append(option)
    return ids


def shipped_path(repo_id: str) -> Path:
    return SHIPPED_CONFIGS / f"{repo_id.replace('/', '--')}.json"


def fetch(repo_id: str) -> dict:
    from huggingface_hub import HfApi, hf_hub_download

    config = json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    shapes = {k: config[k] for k in SHAPE_KEYS if k in config}
    total = HfApi().model_info(repo_id).safetensors.total
    source = f"https://huggingface.co/{repo_id}/blob/main/config.json"
    return {"_source": source, "_parameters": total, **shapes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="refetch every file from the Hub")
    parser.add_argument("--check", action="store_true", help="compare the files with the Hub")
    args = parser.parse_args()
    differ = 0
    for repo_id, options in recipe_hub_ids().items():
        path = shipped_path(repo_id)
        if args.write or args.check:
            fresh = fetch(repo_id)
            if args.write:
                path.write_text(json.dumps(fresh, indent=2) + "\n")
            elif not path.is_file() or json.loads(path.read_text()) != fresh:
                differ += 1
                print(f"differs from the Hub: {path.name}")
        state = "shipped" if path.is_file() else "MISSING"
        print(f"{state:8} {repo_id:45} {', '.join(options)}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
