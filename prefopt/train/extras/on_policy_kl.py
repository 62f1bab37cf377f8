"""On-policy samples and SPO's KL(pi_theta || pi_ref) regularizer (Sharifnassab et al., "Soft
Preference Optimization", arXiv 2405.00747, Eq. 15 and Algorithm 1): the ``on_policy_kl`` extra.

Samples are drawn from the current policy at temperature 1 with no top-k/top-p, so the token-wise
KL summed over a sampled sequence is an unbiased estimate of the sequence KL; one per prompt, for
prompts of the current training step, kept as constants for ``kl_every`` steps.
"""

from __future__ import annotations

from torch import Tensor
from transformers import PreTrainedModel

from prefopt.data.collate import collate
from prefopt.data.tokenize import TokenizedGroup
from prefopt.losses.registry import LossConfig
from prefopt.model import parallel
from prefopt.model.logprobs import StatsModel
from prefopt.model.parallel import unsharded
from prefopt.model.sampling import decoding_config, generate_ids
from prefopt.train.extras.base import ExtraEnv, ExtraState, StepExtra, StepRows

Sample = tuple[list[int], list[int]]  # (prompt ids, sampled response ids)


def sample_responses(
    policy: PreTrainedModel,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
) -> list[Sample]:
    """One sample per prompt; a response ends at its first EOS (kept) or at max_new_tokens."""
    config = decoding_config(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        eos_ids=[eos_id],
        pad_id=pad_id,
    )
    out = generate_ids(policy, prompts, config)
    return [(p, rows[0] or [eos_id]) for p, rows in zip(prompts, out, strict=True)]


def kl_on_samples(
    policy: StatsModel,
    ref: StatsModel,
    samples: list[Sample],
    *,
    pad_id: int,
    eos_id: int,
    chunk_size: int,
) -> Tensor:
    """Mean over samples of the per-sequence summed token-wise KL (SPO Eq. 15)."""
    groups = [(TokenizedGroup(p, [r], [r[-1] == eos_id], [0.0]), (0,)) for p, r in samples]
    batch = collate(groups, pad_id).to(next(policy.parameters()).device)
    return policy.kl(batch, chunk_size, ref).mean()


class OnPolicyKL(StepExtra):
    """SPO's regularizer: ``kl_weight`` x mean KL(pi || ref) on samples regenerated every
    ``kl_every`` steps from this rank's prompts of the current step (Algorithm 1). The samples
    live in the extra's state, so they are checkpointed (per rank) and a resumed run uses the
    same ones."""

    config_fields = ("kl_weight", "kl_every", "kl_num_samples", "kl_max_new_tokens")
    uses_reference = True  # the samples are rows no reference cache holds

    def __init__(self, loss_cfg: LossConfig, env: ExtraEnv) -> None:
        super().__init__(loss_cfg, env)
        self.weight, self.every = loss_cfg.kl_weight, loss_cfg.kl_every
        self.num_samples, self.max_new_tokens = loss_cfg.kl_num_samples, loss_cfg.kl_max_new_tokens

    @classmethod
    def active(cls, loss_cfg: LossConfig) -> bool:
        return loss_cfg.kl_weight > 0  # 0 turns the term (and its reference model) off

    def regularizer(self, policy: StatsModel, rows: StepRows, state: ExtraState):
        """Refresh ``state["samples"]`` if due; return the step's regularizer (a closure)."""
        if not state.get("samples") or rows.step % self.every == 0:
            mine = rows.order[parallel.rank() :: parallel.size()]  # this rank's groups
            prompts = [rows.data[rows.views[i][0]]["prompt_ids"] for i in mine]
            chosen = [prompts[i % len(prompts)] for i in range(self.num_samples)]
            with unsharded(policy):  # generate() bypasses the sharded root's forward
                state["samples"] = sample_responses(
                    policy.model,
                    chosen,
                    max_new_tokens=self.max_new_tokens,
                    eos_id=self.env.eos_id,
                    pad_id=self.env.passes.pad_id,
                )
        samples, ref, passes = state["samples"], self.env.ref, self.env.passes

        def regularize() -> Tensor:
            """Backpropagate kl_weight x KL on every rank, finite or not (the step decides once,
            from the gradient norm every rank shares); return its detached value."""
            with unsharded(ref):  # gathered through the backward, which recomputes chunks
                kl = self.weight * kl_on_samples(
                    policy,
                    ref,
                    samples,
                    pad_id=passes.pad_id,
                    eos_id=self.env.eos_id,
                    chunk_size=passes.chunk_size,
                )
                kl.backward()
            return kl.detach()

        return regularize
