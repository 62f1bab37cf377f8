"""Judge two models' outputs with a reward model: win rate and length-controlled win rate.

AlpacaEval compares a model with a baseline through GPT-4 preferences; here the judge is a Hugging
Face sequence-classification reward model (RM) with one output, and the preference for the model on
prompt i is the Bradley-Terry probability ``p_i = sigmoid(r_i - r_base_i)`` of the two RM scores.

- ``win_rate`` is ``100 * mean(p_i)`` (AlpacaEval's soft win rate); ``discrete_win_rate`` counts
  wins as 1 and ties as 1/2.
- ``lc_win_rate`` is the length-controlled win rate of AlpacaEval 2 (Dubois et al. 2024,
  "Length-Controlled AlpacaEval: A Simple Way to Debias Automatic Evaluators", arXiv 2404.04475,
  Sec. 3): fit the logistic GLM ``p_i ~ sigmoid(theta + phi * tanh(dlen_i / std(dlen)))`` to the
  soft preferences by maximum likelihood, then predict with zero length difference:
  ``100 * sigmoid(theta)``. ``std`` is the sample standard deviation, as in AlpacaEval
  (``pandas.Series.std``). The paper's GLM also has an instruction-difficulty term ``gamma_x``;
  it is left out because it is estimated jointly over many models (AlpacaEval fits it once on its
  leaderboard), and with one model against one baseline it is not identifiable from the data.
  AlpacaEval measures length in characters; callers choose the unit.

RM inputs follow prefopt's tokenization conventions (prefopt/data/tokenize.py): the chat template
is tokenized without special tokens, then given exactly one leading BOS when the tokenizer uses one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prefopt.data.tokenize import encode_with_bos
from prefopt.errors import hub_download
from prefopt.model.load import DTYPES

log = logging.getLogger(__name__)

Prompt = str | list[dict]
LC_L2 = 1e-4  # ridge on phi: keeps the Newton steps well posed, shrinks phi by well under 1%
_P_EPS = 1e-9  # p is clipped for the fit only: a saturated p (margin > ~37) has an infinite logit


def load_reward_model(
    name_or_path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sequence-classification RM with one output, in eval mode, and its tokenizer."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    # Check the head before loading weights: a classifier with 2+ labels is not a reward model.
    with hub_download("reward model", name_or_path):  # offline: one message naming it
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    if config.num_labels != 1:
        raise ValueError(
            f"{name_or_path!r} has num_labels={config.num_labels}; a reward model has one output"
        )
    with hub_download("reward model", name_or_path):
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, config=config, dtype=DTYPES[dtype], **kwargs
        )
        tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    text_config = model.config.get_text_config()
    pad_id = getattr(text_config, "pad_token_id", None)
    if pad_id is None:
        # Batched sequence classification pools the rightmost non-pad token, so it needs an id.
        if tok.pad_token_id is None:
            if tok.eos_token is None:
                raise ValueError(f"{name_or_path!r} has neither a pad nor an EOS token")
            tok.pad_token = tok.eos_token
        pad_id = tok.pad_token_id
        text_config.pad_token_id = pad_id
        model.config.pad_token_id = pad_id
    elif tok.pad_token_id is None:
        tok.pad_token = tok.convert_ids_to_tokens(pad_id)
    return model.to(device).eval(), tok


def _messages(prompt: Prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def encode(
    tok: PreTrainedTokenizerBase, prompt: Prompt, response: str, max_length: int = 2048
) -> list[int]:
    """Token ids the RM reads for one (prompt, response) pair.

    With a chat template: the chat [prompt turns, assistant response], tokenized without special
    tokens and given exactly one leading BOS when the tokenizer uses one (templates that write BOS
    and tokenizers that add it are both handled, never doubled). Without one: "prompt\\n\\nresponse"
    with the tokenizer's own special tokens, which are then the RM's format (e.g. [CLS] ... [SEP]).

    Over-long inputs keep their leading special token (BOS or CLS) and their last
    ``max_length - 1`` tokens: the RM's score is read at the last token, after the end of the
    response, so the start of the prompt is what is dropped.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    messages = _messages(prompt)
    if tok.chat_template:
        chat = [*messages, {"role": "assistant", "content": response}]
        ids = encode_with_bos(tok, tok.apply_chat_template(chat, tokenize=False))
    else:
        text = "\n\n".join([*(m["content"] for m in messages), response])
        ids = tok(text, add_special_tokens=True).input_ids
    if len(ids) > max_length:
        head = ids[:1] if ids[0] in tok.all_special_ids else []
        ids = head + ids[len(ids) - (max_length - len(head)) :]
    return ids


@torch.no_grad()
def score(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 2048,
) -> list[float]:
    """RM scores of each (prompt, response) pair, formatted and truncated by ``encode``.

    Rows are padded on the right with the model's pad id whatever ``tok.padding_side`` says, so the
    real tokens keep positions 0..L-1 and the model's pooling (the rightmost non-pad token) reads
    the last real token: a score does not depend on what it is batched with.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    pad_id = getattr(model.config.get_text_config(), "pad_token_id", None)
    if pad_id is None:
        raise ValueError("model.config.pad_token_id is None; load the RM with load_reward_model")
    encoded = [encode(tok, p, r, max_length) for p, r in zip(prompts, responses, strict=True)]
    if any(ids[-1] == pad_id for ids in encoded):
        log.warning(
            "some RM inputs end with the pad token (id %d); the model pools the last token before "
            "it, as it did in training if the RM was trained with this pad id",
            pad_id,
        )
    # Similar lengths share a batch: less padding, same scores.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    scores = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            attention_mask[row, : len(encoded[i])] = 1
        logits = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
        ).logits  # (b, 1)
        for row, i in enumerate(rows):
            scores[i] = float(logits[row, 0])
    return scores


def _fit_length_glm(p: torch.Tensor, x: torch.Tensor | None) -> tuple[float, float]:
    """ML fit of p ~ sigmoid(theta + phi * x) on soft targets p; (theta, phi). x None: phi = 0."""
    p = p.clamp(_P_EPS, 1 - _P_EPS)
    if x is None:
        return math.log(p.mean() / (1 - p.mean())), 0.0  # the intercept-only MLE
    design = torch.stack([torch.ones_like(x), x], dim=1)  # (n, 2)
    ridge = torch.tensor([0.0, LC_L2], dtype=torch.float64)

    def loss(w: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(design @ w, p) + 0.5 * (ridge * w * w).sum()

    # Newton's method with backtracking: the loss is convex and smooth, two parameters.
    w = torch.tensor([math.log(p.mean() / (1 - p.mean())), 0.0], dtype=torch.float64)
    for _ in range(100):
        s = torch.sigmoid(design @ w)
        grad = design.T @ (s - p) / len(p) + ridge * w
        hess = (design.T * (s * (1 - s))) @ design / len(p) + torch.diag(ridge)
        step = torch.linalg.solve(hess + 1e-12 * torch.eye(2, dtype=torch.float64), grad)
        t, current = 1.0, loss(w)
        while loss(w - t * step) > current and t > 1e-10:
            t /= 2
        w = w - t * step
        if float((t * step).abs().max()) < 1e-12:
            break
    return float(w[0]), float(w[1])


def win_rates(
    scores: Sequence[float],
    baseline_scores: Sequence[float],
    lengths: Sequence[float],
    baseline_lengths: Sequence[float],
) -> dict[str, float]:
    """Win rates (in %) of a model against a baseline from per-prompt RM scores and lengths.

    Returns n, win_rate, discrete_win_rate, wins, ties, losses, lc_win_rate, lc_phi (the fitted
    length coefficient; 0 when all length differences are equal), avg_length, baseline_avg_length.
    """
    n = len(scores)
    if not n == len(baseline_scores) == len(lengths) == len(baseline_lengths):
        raise ValueError(
            f"mismatched lengths: {n} scores, {len(baseline_scores)} baseline_scores, "
            f"{len(lengths)} lengths, {len(baseline_lengths)} baseline_lengths"
        )
    if n == 0:
        raise ValueError("win_rates needs at least one prompt")
    r, r_base, length, base_length = (
        torch.tensor(v, dtype=torch.float64)
        for v in (scores, baseline_scores, lengths, baseline_lengths)
    )
    if not all(torch.isfinite(v).all() for v in (r, r_base, length, base_length)):
        raise ValueError("scores and lengths must be finite")
    margin = r - r_base  # (n,)
    p = torch.sigmoid(margin)
    wins, ties = int((margin > 0).sum()), int((margin == 0).sum())
    dlen = length - base_length
    std = float(dlen.std()) if n > 1 else 0.0  # sample std, as AlpacaEval
    # Equal length differences (std 0) carry no length signal: the GLM keeps its intercept only.
    x = torch.tanh(dlen / std) if std > 0 else None
    theta, phi = _fit_length_glm(p, x)
    return {
        "n": n,
        "win_rate": 100 * float(p.mean()),
        "discrete_win_rate": 100 * (wins + 0.5 * ties) / n,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "lc_win_rate": 100 / (1 + math.exp(-theta)),
        "lc_phi": phi,
        "avg_length": float(length.mean()),
        "baseline_avg_length": float(base_length.mean()),
    }
