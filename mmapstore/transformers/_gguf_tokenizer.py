"""The tokenizer a GGUF file carries in its metadata, for ``mmapstore run --prompt``.

transformers builds it (vocabulary, merges, special tokens) from the file's
``tokenizer.ggml.*`` keys, but two things stop it short for the MoE files
people have:

- ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` first builds the
  model's config, and refuses the architectures transformers reads no model
  from (``deepseek2``: DeepSeek-V3/R1, Kimi-K2; ``glm4moe``).  The
  tokenizer itself needs no config, so for the architectures read here it
  is built directly (:class:`~transformers.PreTrainedTokenizerFast`).
- A byte-level BPE's text is first split by a rule the file names only by
  ``tokenizer.ggml.pre``.  transformers knows some of these names; for the
  others it keeps GPT-2's rule, which splits numbers, CJK text and
  punctuation differently from the model's own tokenizer.  The rules below
  are llama.cpp's for the MoE families (``llama-vocab.cpp``): the same
  regular expressions, applied one after the other as llama.cpp applies them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..formats import Checkpoint
from ._gguf import own_architecture

__all__ = ["PRE_TOKENIZER_SPLITS", "gguf_tokenizer"]

_log = logging.getLogger(__name__)

_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
# Kimi-K2's tiktoken pattern (llama.cpp implements it by hand): letters exclude Han, which has its own branch.
_KIMI_K2 = (
    r"[\p{Han}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ``tokenizer.ggml.pre`` -> the regular expressions that split text before the merges, in order.
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "deepseek-v3": _DEEPSEEK_V3,
    "kimi-k2": (_KIMI_K2,),
    "glm4": (_LLAMA3,),
    "chatglm-bpe": (_LLAMA3,),
}


def gguf_tokenizer(checkpoint: Checkpoint) -> Any:
    """The tokenizer of a GGUF checkpoint (read from its first part), splitting text as the model's does.

    Raises
    ------
    ValueError, OSError, KeyError
        transformers cannot build a tokenizer from the file's metadata (no
        vocabulary, a tokenizer model it does not know).
    """
    path = checkpoint.files[0]
    directory, name = os.path.dirname(path) or ".", os.path.basename(path)
    metadata = checkpoint.metadata or {}
    if own_architecture(metadata):  # transformers builds no config for these: the tokenizer needs none
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(directory, gguf_file=name)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    if metadata.get("tokenizer.ggml.model") == "gpt2":
        _set_splits(tokenizer, str(metadata.get("tokenizer.ggml.pre", "")), path)
    return tokenizer


def _set_splits(tokenizer: Any, pre: str, path: str) -> None:
    """Split text by llama.cpp's rule for ``pre`` where transformers has none; warn where neither has one."""
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        known = _transformers_splits()
        if known is not None and pre not in known:
            _log.warning(
                "%s: tokenizer.ggml.pre %r is not a rule known here or to transformers: text is split by "
                "GPT-2's rule, which may differ from the model's own tokenizer",
                path,
                pre,
            )
        return
    from tokenizers import Regex, pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _transformers_splits() -> frozenset[str] | None:
    """The ``tokenizer.ggml.pre`` names transformers gives a split rule (None where it cannot tell)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # another layout: no warning we cannot back
        return None
    return frozenset(GGUF_PRE_TOKENIZER_SPLITS)
