"""The tokenizer a GGUF file carries in its metadata, for ``mmapstore run --prompt``.

transformers builds it from the file's ``tokenizer.ggml.*`` keys, but two
things stop it short for the MoE files people have:

- For the architectures transformers reads no model from (``deepseek2``:
  DeepSeek-V3/R1, Kimi-K2; ``glm4moe``, ``llama4``, ``olmoe``...), its GGUF
  tokenizer path either needs the model config first or refuses the
  architecture outright (some transformers 5 releases).  A byte-level BPE
  (``tokenizer.ggml.model == "gpt2"``, what every one of them uses) needs
  neither: it is built here with the ``tokenizers`` library, from the
  vocabulary, the merges, the control tokens (special), the user-defined ones
  (added whole) and ``add_bos_token``.  Other files go through transformers.
- A byte-level BPE's text is first split by a rule the file names only by
  ``tokenizer.ggml.pre``.  transformers knows some of these names; for the
  others it keeps GPT-2's rule, which splits numbers, CJK text and
  punctuation differently from the model's own tokenizer.  The rules below
  are llama.cpp's (``llama-vocab.cpp``) or, where it implements one by hand,
  the model's own pattern: regular expressions applied one after the other,
  as llama.cpp applies them.
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

_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# o200k (GPT-4o): GPT-OSS, Llama-4, MiniMax-M2.
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ``tokenizer.ggml.pre`` -> the regular expressions that split text before the merges, in order
# (an empty tuple: GPT-2's own rule, the byte-level pre-tokenizer's).
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "deepseek-v3": _DEEPSEEK_V3,
    "kimi-k2": (_KIMI_K2,),
    "glm4": (_LLAMA3,),
    "chatglm-bpe": (_LLAMA3,),
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
    "dbrx": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
    "gpt-4o": (_GPT4O,),
    "llama4": (_GPT4O,),
    "minimax-m2": (_GPT4O,),
    "gpt-2": (),
    "olmo": (),
}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


def gguf_tokenizer(checkpoint: Checkpoint) -> Any:
    """The tokenizer of a GGUF checkpoint (from its first part's metadata), splitting text as the model's does.

    Raises
    ------
    ValueError, OSError, KeyError
        No tokenizer can be built from the file's metadata (no vocabulary,
        no merges, a tokenizer model transformers does not know).
    """
    path = checkpoint.files[0]
    metadata = checkpoint.metadata or {}
    byte_level = metadata.get("tokenizer.ggml.model") == "gpt2"
    if own_architecture(metadata) and byte_level:
        return _byte_level(path, metadata)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory, name = os.path.dirname(path) or ".", os.path.basename(path)
    loader = PreTrainedTokenizerFast if own_architecture(metadata) else AutoTokenizer  # no config for our own
    tokenizer = loader.from_pretrained(directory, gguf_file=name)
    pre = str(metadata.get("tokenizer.ggml.pre", ""))
    if byte_level and PRE_TOKENIZER_SPLITS.get(pre) and pre not in (_transformers_splits() or ()):
        tokenizer.backend_tokenizer.pre_tokenizer = _pre_tokenizer(PRE_TOKENIZER_SPLITS[pre])
    return tokenizer


def _byte_level(path: str, metadata: dict[str, Any]) -> Any:
    """A byte-level BPE from ``tokenizer.ggml.*``, as llama.cpp reads one."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    tokens, merges = metadata.get("tokenizer.ggml.tokens"), metadata.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise ValueError(f"{path}: a byte-level vocabulary needs tokenizer.ggml.tokens and tokenizer.ggml.merges")
    types = metadata.get("tokenizer.ggml.token_type")
    kinds = types if isinstance(types, list) and len(types) == len(tokens) else [1] * len(tokens)
    backend = Tokenizer(
        models.BPE(
            vocab={str(token): index for index, token in enumerate(tokens)},
            merges=[_pair(str(merge)) for merge in merges],
        )
    )
    pre = str(metadata.get("tokenizer.ggml.pre", ""))
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        _log.warning(
            "%s: tokenizer.ggml.pre %r is not a rule known here: text is split by GPT-2's rule, as llama.cpp "
            "splits it by its default, which may differ from the model's own tokenizer",
            path,
            pre,
        )
    backend.pre_tokenizer = _pre_tokenizer(splits or ())
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [
            AddedToken(str(t), special=True, normalized=False)
            for t, k in zip(tokens, kinds, strict=True)
            if k == _CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(str(t), special=False, normalized=False)
            for t, k in zip(tokens, kinds, strict=True)
            if k == _USER_DEFINED
        ]
    )
    named = {
        role: str(tokens[index])
        for role, key in (
            ("bos_token", "bos"),
            ("eos_token", "eos"),
            ("unk_token", "unknown"),
            ("pad_token", "padding"),
        )
        if isinstance(index := metadata.get(f"tokenizer.ggml.{key}_token_id"), int) and 0 <= index < len(tokens)
    }
    bos = named.get("bos_token")
    if metadata.get("tokenizer.ggml.add_bos_token") is True and bos is not None:
        bos_id = tokens.index(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **named)


def _pair(merge: str) -> tuple[str, str]:
    """A merge ``"left right"`` as its two tokens (llama.cpp looks for the space from the second character)."""
    cut = merge.find(" ", 1)
    if cut < 0:
        raise ValueError(f"merge {merge!r} is not two tokens")
    return merge[:cut], merge[cut + 1 :]


def _pre_tokenizer(splits: tuple[str, ...]) -> Any:
    """The ``splits`` applied in turn (each match its own piece), then bytes as the vocabulary spells them;
    no splits: GPT-2's rule (the byte-level pre-tokenizer's own)."""
    from tokenizers import Regex, pre_tokenizers

    if not splits:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _transformers_splits() -> frozenset[str] | None:
    """The ``tokenizer.ggml.pre`` names transformers gives a split rule (None where it cannot tell)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # another layout, or a transformers without the table: ours apply
        return None
    return frozenset(GGUF_PRE_TOKENIZER_SPLITS)
