"""Typed config schemas, registered in Hydra's ConfigStore before composition.

Each group's YAML files name their schema in ``defaults`` (``_schema`` here, ``_schema_<loss>``
for losses, stored by the loss registry), so an unknown key or a wrong type fails at composition
with a message naming the key. The entry points turn the composed config into these dataclasses
once (``prefopt.checks.validate``: ``OmegaConf.to_object``); the code below them takes the typed
part it needs.

Each set of allowed values is declared once, here, as a ``Literal``; the field that takes it is
made by ``choice`` (OmegaConf has no ``Literal`` type: the field is a ``str`` that carries its
values), ``prefopt.checks`` refuses any other value naming the key, and code that needs the
values reads them with ``options``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any, Literal, get_args

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, OmegaConf

from prefopt.errors import ConfigError, report_user_errors
from prefopt.launch import job_start

Source = Literal["hub", "gguf", "tiny"]
Dtype = Literal["float32", "bfloat16", "float16"]  # the weights' dtype on disk or for inference
Quantize = Literal["none", "4bit", "8bit"]
Aspect = Literal["helpfulness", "honesty", "instruction_following", "truthfulness"]  # UltraFeedback
ScoreField = Literal["overall_score", "fine-grained_score", Aspect, "mean_aspects"]
BadRows = Literal["error", "skip"]
Pairs = Literal["best_vs_worst", "best_vs_each", "all_pairs"]
PromptTruncation = Literal["keep_end", "skip", "error"]
ResponseTruncation = Literal["cut_end", "skip", "error"]
Layout = Literal["padded", "packed", "shared"]
Schedule = Literal["cosine", "linear", "constant"]
Device = Literal["auto", "cpu", "cuda"]
ComputePrecision = Literal["auto", "bf16", "fp32"]
MasterDtype = Literal["float32", "bfloat16"]
GradSync = Literal["every", "last"]
ReferenceMode = Literal["model", "precompute"]
LoggerKind = Literal["none", "wandb"]
LoggerMode = Literal["auto", "online", "offline"]


def options(kind: Any) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` declared here, in order."""
    return get_args(kind)


def choice(kind: Any, *default: str | None) -> Any:
    """A ``str`` field whose allowed values are ``kind``'s; its default is the first of them, or
    the one given (``None`` for an optional field)."""
    values = options(kind)
    return field(default=default[0] if default else values[0], metadata={"choices": values})


def check_choice(key: str, value: str, kind: Any) -> None:
    """Refuse a value that ``kind`` does not allow, naming the key (``prefopt.checks`` runs it on
    every ``choice`` field of a composed config; library calls given a bare string run it too)."""
    if value not in options(kind):
        raise ConfigError(f"{key}={value!r}: expected one of {options(kind)}")


LAYOUTS = options(Layout)


@dataclass
class TinyModelConfig:
    """A random Llama built in code (tests, smoke runs). Its byte-level tokenizer is built too."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on a frozen base: ``+model/lora=default``
    (``prefopt/model/adapters.py``)."""

    rank: int = 16  # r: the adapters' inner dimension
    alpha: float = 32.0  # scaling alpha / rank (alpha / sqrt(rank) with use_rslora)
    dropout: float = 0.0  # on the adapter's input; 0 keeps training deterministic per seed
    # peft module names; "all-linear": every attention and MLP projection, not the output layer
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    use_rslora: bool = False  # rank-stabilised scaling (Kalajdzievski 2023, arXiv:2312.03732)
    export_merged: bool = False  # also write <run_dir>/final_merged: base + adapters, HF format


@dataclass
class ModelConfig:
    name_or_path: str = MISSING  # Hub id or local directory (the tokenizer comes from here too)
    revision: str | None = None
    source: str = choice(Source)  # hub | gguf (convert a GGUF file once, cache safetensors) | tiny
    gguf_package: str | None = None  # Python package shipping the GGUF file (source=gguf)
    gguf_file: str | None = None  # file name inside that package, or an absolute path
    dtype: str = choice(Dtype)  # dtype of the weights on disk; training keeps fp32 master weights
    attn_implementation: str = "auto"  # auto: the fastest exact kernel for the layout
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig | None = None  # None: full fine-tuning; +model/lora=default for adapters
    quantize: str = choice(Quantize)  # 4bit (QLoRA, NF4) | 8bit: the frozen base via bitsandbytes


@dataclass
class DatasetConfig:
    schema: str = "canonical"  # canonical | ultrafeedback | ultrafeedback_binarized | armorm
    path: str = MISSING  # Hub id, or a local .jsonl/.json/.parquet file
    train_split: str = "train"
    eval_path: str | None = None  # local eval file; else eval_split of ``path``
    eval_split: str | None = None  # None and no eval_path: hold out eval_size rows of train
    eval_size: int = 64
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    # ultrafeedback only: which rating becomes the score
    score_field: str = choice(ScoreField, "fine-grained_score")
    bad_rows: str = choice(BadRows)  # error: stop naming file/row/key | skip: drop, log the count
    pairs: str = choice(Pairs)  # how pairwise (K = 2) losses read a group
    max_length: int = 1024  # prompt + response tokens per sequence
    max_prompt_length: int = 512
    prompt_truncation: str = choice(PromptTruncation)  # keep_end: drop the oldest tokens
    response_truncation: str = choice(ResponseTruncation)  # cut_end: the response loses its EOS
    system_prompt: str | None = None  # prepended as a system message when the prompt has none
    cache: bool = True  # cache tokenized data under ${cache_dir}/tokenized


@dataclass
class OptimizerConfig:
    _target_: str = "torch.optim.AdamW"  # or bitsandbytes.optim.AdamW8bit / PagedAdamW8bit
    _partial_: bool = True  # params are passed by the loop
    lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    eps: float = 1e-8


@dataclass
class TrainerConfig:
    max_steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: float = 1.0
    global_batch_groups: int = 32  # prompt groups per optimizer step (all ranks together)
    micro_batch_groups: int = 4  # groups per forward; accumulation = global / micro
    # > 0: fill micro-batches to this many forward positions instead (length-grouped, per step)
    micro_batch_tokens: int = 0
    layout: str = choice(Layout)  # packed: one row, no padding; shared: each prompt once
    compile: bool = False  # torch.compile each decoder block (dynamic shapes)
    warmup_ratio: float = 0.1
    schedule: str = choice(Schedule)  # after linear warmup
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0  # steps; 0 = only before and after training
    eval_batch_groups: int = 8
    save_every: int = 0  # steps; 0 = only at the end
    keep_last: int = 2  # checkpoints kept
    resume: str = "auto"  # auto (latest checkpoint in the run dir) | never | <checkpoint dir>
    stop_at_step: int = 0  # checkpoint and stop here as if preempted (time-boxed jobs); 0 = off
    export_final: bool = True  # HF-format model + tokenizer in <run_dir>/final
    log_every: int = 1
    device: str = choice(Device)
    precision: str = choice(ComputePrecision)  # compute dtype; auto: bf16 on CUDA, fp32 on CPU
    # the policy's sharded weights, gradients and optimizer state: float32 (master weights, any
    # dtype on disk) | bfloat16 (half the memory; needs optimizer=adamw_bf16_sr, which rounds
    # stochastically so small updates are not lost)
    master_dtype: str = choice(MasterDtype)
    # when micro-batch gradients are reduce-scattered: every (each micro-batch; they accumulate
    # sharded, torchtitan's choice) | last (the last micro-batch of a step only: fewer
    # collectives, but until then FSDP2 holds an unsharded fp32 gradient of every trainable
    # parameter on every rank, 4 bytes per parameter whatever the world size; docs/scale.md)
    grad_sync: str = choice(GradSync)
    logps_chunk_size: int = 1024  # response tokens per log-prob chunk (peak memory ~ chunk x vocab)
    reference: str = choice(ReferenceMode)  # model: frozen copy in the loop; precompute: cached
    collective_timeout_s: float = 600.0  # a rank that stops answering fails the job after this
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    progress: bool = True  # console progress bar
    train_top_blocks: int = 0  # > 0: freeze all but the top N decoder blocks (CPU demo); 0 = all
    dry_run: bool = False  # compose, load tokenizer and data, print the banner and exit


@dataclass
class LoggerConfig:
    kind: str = choice(LoggerKind)  # metrics.jsonl is always written
    project: str = "prefopt"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = choice(LoggerMode)  # auto: online with WANDB_API_KEY, else offline


@dataclass
class RecipeInfo:
    """Set by conf/recipe/<model>.yaml: which recipe composed the run, and its learning rate
    (``optimizer.lr`` interpolates it; the banner warns when an override is 10x off)."""

    name: str = "none"
    lr: float | None = None


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    loss: Any = MISSING  # each loss YAML brings its own schema (loss/_schema_<name>)
    optimizer: OptimizerConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    recipe: RecipeInfo = field(default_factory=RecipeInfo)
    exp_name: str = "default"
    seed: int = 0
    run_dir: str = MISSING  # set by conf/train.yaml from hydra's output dir
    cache_dir: str = MISSING  # converted models, tokenized data


@dataclass
class GenerationConfig:
    """Decoding settings (recorded next to every output file)."""

    max_new_tokens: int = 512
    do_sample: bool = False  # False: greedy (benchmark submissions); True: sample
    temperature: float = 1.0  # do_sample only
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    num_samples: int = 1  # responses per prompt (datagen's K); > 1 needs do_sample
    batch_size: int = 16  # prompts per generate call
    max_prompt_length: int = 2048  # longer prompts keep their end (counted)
    system_prompt: str | None = None  # prepended as a system message when a prompt has none


@dataclass
class PromptsConfig:
    """A prompt set: a local or hf:// JSON/JSONL file, or the offline constraint benchmark."""

    name: str = MISSING  # written as AlpacaEval's ``dataset`` / the bench name
    source: str = "file"  # file | constraints
    path: str | None = None  # file: local path or hf://datasets/<repo>/<file>
    split: str = "heldout"  # constraints: train | heldout
    n: int = 64  # constraints: number of tasks
    seed: int = 0  # constraints: generator seed
    limit: int | None = None  # only the first N prompts (smoke runs)


@dataclass
class GenerateConfig:
    model: ModelConfig = MISSING
    prompts: PromptsConfig = MISSING
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    model_id: str | None = None  # the name written as generator / model_id; None: from the model
    device: str = choice(Device)
    dtype: str | None = choice(Dtype, None)  # override model.dtype for inference (bf16 on GPU)
    seed: int = 0
    out_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class ScorerConfig:
    kind: str = "verifier"  # verifier (constraint tasks) | reward_model
    reward_model: str | None = None  # Hub id or directory of a sequence-classification RM
    batch_size: int = 8
    max_length: int = 2048


@dataclass
class DatagenConfig(GenerateConfig):
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    drop_ties: bool = True  # drop (and count) prompts whose K scores are all equal
    out_file: str = MISSING  # canonical multi-response JSONL, appended batch by batch


@dataclass
class JudgeConfig:
    reward_model: str = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"
    outputs: str | None = None  # AlpacaEval-format model_outputs.json of the evaluated model
    baseline: str | None = None  # the same prompts answered by the baseline model
    batch_size: int = 8
    max_length: int = 4096
    dtype: str = choice(Dtype)


@dataclass
class EvaluateConfig(GenerateConfig):
    tasks: list[str] = field(default_factory=lambda: ["preference", "constraints"])
    outputs: str | None = None  # constraints/lengths: score this generations file, do not generate
    ref_model: str | None = None  # preference with a reference-based loss: directory or Hub id
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    dataset: DatasetConfig = MISSING
    loss: Any = MISSING
    trainer: TrainerConfig = MISSING


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="_train_schema", node=TrainConfig)
    cs.store(name="_generate_schema", node=GenerateConfig)
    cs.store(name="_datagen_schema", node=DatagenConfig)
    cs.store(name="_evaluate_schema", node=EvaluateConfig)
    for group, node in [
        ("model", ModelConfig),
        ("dataset", DatasetConfig),
        ("optimizer", OptimizerConfig),
        ("trainer", TrainerConfig),
        ("logger", LoggerConfig),
        ("prompts", PromptsConfig),
    ]:
        cs.store(group=group, name="_schema", node=node)
    cs.store(group="model/lora", name="_schema", node=LoraConfig)


def asset_path(name: str) -> str:
    """Path of a file shipped in ``prefopt/assets`` (``${asset:name}`` in configs)."""
    return str(files("prefopt") / "assets" / name)


def run_dir() -> str:
    """``run_dir``: the job's output dir; before a job runs (``--cfg job --resolve``), the dir
    ``hydra.run.dir`` gives."""
    hydra = HydraConfig.get()
    return OmegaConf.select(hydra, "runtime.output_dir", default=None) or hydra.run.dir


register_configs()
if not OmegaConf.has_resolver("asset"):
    OmegaConf.register_new_resolver("asset", asset_path)
    # cached like Hydra's now: one value per config (a sweep's jobs copy the cache)
    # report_user_errors: Hydra resolves run dirs outside the task, where its own report is a stack
    OmegaConf.register_new_resolver("prefopt.now", report_user_errors(job_start), use_cache=True)
    OmegaConf.register_new_resolver("prefopt.run_dir", run_dir)
