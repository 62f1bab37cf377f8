"""Example -> TokenizedGroup with the model's chat template.

Conventions (tested in tests/test_data.py):
- the prompt is the chat template applied with ``add_generation_prompt=True``; it carries exactly
  one leading BOS when the tokenizer uses one (templates that write BOS and tokenizers that add it
  are both handled, never doubled);
- each response is its text tokenized with special-token strings split (a literal "</s>" in the
  text is text), followed by exactly one EOS; only response tokens are trained on;
- truncation: an over-long prompt keeps its end (the latest turns; BOS stays), an over-long
  response is cut at the end and so loses its EOS (``has_eos`` False). Both are counted.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from prefopt.config import DatasetConfig, PromptTruncation, ResponseTruncation, check_choice
from prefopt.data.example import DataError, Example
from prefopt.errors import ConfigError


@dataclass(frozen=True)
class TokenizeOptions:
    max_length: int = 1024  # prompt + response tokens of one sequence
    max_prompt_length: int = 512
    prompt_truncation: str = "keep_end"
    response_truncation: str = "cut_end"
    system_prompt: str | None = None

    @classmethod
    def of(cls, d: DatasetConfig) -> TokenizeOptions:
        """The ``dataset`` config's lengths, truncation policies and system prompt."""
        return cls(
            d.max_length,
            d.max_prompt_length,
            d.prompt_truncation,
            d.response_truncation,
            d.system_prompt,
        )

    def __post_init__(self) -> None:
        check_choice("dataset.prompt_truncation", self.prompt_truncation, PromptTruncation)
        check_choice("dataset.response_truncation", self.response_truncation, ResponseTruncation)
        if not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(
                f"dataset.max_prompt_length={self.max_prompt_length} must be in (0, "
                f"dataset.max_length={self.max_length})"
            )


@dataclass(frozen=True)
class TokenizedGroup:
    prompt_ids: list[int]
    response_ids: list[list[int]]  # each ends with EOS unless truncation cut it
    has_eos: list[bool]
    scores: list[float]
    id: str = ""
    # Filled by the reference precompute pass (trainer.reference=precompute), one per response.
    ref_logps: list[float] | None = None
    ref_eos_logps: list[float] | None = None


def adds_bos(tok: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts a BOS in front of text it encodes with its special tokens."""
    bos = tok.bos_token_id
    return bos is not None and tok("a", add_special_tokens=True).input_ids[:1] == [bos]


def encode_with_bos(
    tok: PreTrainedTokenizerBase, text: str, add_bos: bool | None = None
) -> list[int]:
    """Ids of chat-template ``text`` with exactly one leading BOS when the tokenizer uses one.

    The text is tokenized without special tokens (some tokenizers would also append an EOS the
    template lacks); a BOS the template wrote is kept, a missing one added, a doubled one dropped.
    ``add_bos`` is ``adds_bos(tok)``, which callers encoding many texts pass once.
    """
    ids = tok(text, add_special_tokens=False).input_ids
    bos = tok.bos_token_id
    if (adds_bos(tok) if add_bos is None else add_bos) and ids[:1] != [bos]:
        ids = [bos, *ids]
    while bos is not None and ids[:2] == [bos, bos]:
        ids = ids[1:]
    return ids


def keep_end(ids: list[int], limit: int, bos: int | None) -> list[int]:
    """The last ``limit`` tokens of an over-long prompt (its latest turns); a leading BOS stays."""
    head = ids[:1] if bos is not None and ids[:1] == [bos] else []
    return head + ids[len(ids) - (limit - len(head)) :]


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """Hash of everything tokenization depends on: vocabulary, merges, specials, chat template."""
    parts = [
        tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else repr(tok),
        str(tok.chat_template),
        str((tok.bos_token_id, tok.eos_token_id, adds_bos(tok))),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


class Tokenizer:
    """Tokenizes Examples for one tokenizer and one set of options, counting truncations."""

    def __init__(self, tok: PreTrainedTokenizerBase, opts: TokenizeOptions) -> None:
        if tok.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; responses must end with one")
        self.tok, self.opts = tok, opts
        self.bos, self.eos = tok.bos_token_id, tok.eos_token_id
        self.add_bos = adds_bos(tok)
        self.counts: Counter[str] = Counter()

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if self.opts.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.opts.system_prompt}, *messages]
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return encode_with_bos(self.tok, text, self.add_bos)

    def response_ids(self, text: str) -> list[int]:
        if self.tok.eos_token and text.endswith(self.tok.eos_token):
            text = text[: -len(self.tok.eos_token)]
        ids = self.tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
        return [*ids, self.eos]

    def _over_limit(self, policy: str, message: str, what: str) -> bool:
        """Apply a truncation policy: raise (error), count and return True (skip), or False."""
        if policy == "error":
            raise DataError(message)
        if policy == "skip":
            self.counts[f"skipped_long_{what}"] += 1
            return True
        self.counts[f"truncated_{what}s"] += 1
        return False

    def __call__(self, ex: Example, where: str) -> TokenizedGroup | None:
        """The tokenized group, or None when a truncation policy says skip (counted)."""
        o = self.opts
        prompt = self.prompt_ids(ex.prompt)
        if len(prompt) > o.max_prompt_length:
            msg = (
                f"{where}: key 'prompt': {len(prompt)} tokens > "
                f"dataset.max_prompt_length={o.max_prompt_length}"
            )
            if self._over_limit(o.prompt_truncation, msg, "prompt"):
                return None
            prompt = keep_end(prompt, o.max_prompt_length, self.bos)
        budget = o.max_length - len(prompt)
        responses, has_eos = [], []
        for k, text in enumerate(ex.responses):
            ids = self.response_ids(text)
            if len(ids) == 1:  # only the EOS string: an empty response in disguise, a bad row
                eos = self.tok.eos_token
                raise DataError(f"{where}: key 'responses'[{k}]: response is only the EOS {eos!r}")
            if len(ids) > budget:
                msg = (
                    f"{where}: key 'responses'[{k}]: {len(prompt)} prompt + {len(ids)} "
                    f"response tokens > dataset.max_length={o.max_length}"
                )
                if self._over_limit(o.response_truncation, msg, "response"):
                    return None
                ids = ids[:budget]
            responses.append(ids)
            has_eos.append(ids[-1] == self.eos)
        self.counts["groups"] += 1
        return TokenizedGroup(prompt, responses, has_eos, list(ex.scores), ex.id)


def options_key(opts: TokenizeOptions) -> str:
    return json.dumps(opts.__dict__, sort_keys=True)
