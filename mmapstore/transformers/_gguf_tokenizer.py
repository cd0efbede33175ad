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
  are regular expressions applied one after the other, as llama.cpp applies
  them, and aim at the model's own tokenizer: they are llama.cpp's where
  llama.cpp's are the model's (``deepseek-v3``, ``glm4``, ``qwen2``,
  ``llama-bpe``...), and the model's own pattern where llama.cpp
  approximates it (``gpt-4o``/``llama4``/``minimax-m2``: llama.cpp's letter
  classes are ASCII-only; ``kimi-k2``: llama.cpp's hand-written splitter
  does not split at case changes).  A missing or unknown name gets
  llama.cpp's default rule, with a warning for an unknown one; Llama-3's
  family takes a piece that is a token whole before any merge and adds BOS
  where the file does not say, as llama.cpp does.
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

# llama.cpp's rule for a missing or unknown ``tokenizer.ggml.pre`` (LLAMA_VOCAB_PRE_TYPE_DEFAULT).
_DEFAULT = (
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)
# Llama-3's family in llama.cpp: a piece that is a token is taken whole before any merge, and BOS is added
# where the file does not say.
_WHOLE_TOKENS_FIRST = frozenset({"llama3", "llama-v3", "llama-bpe"})
_BOS_BY_DEFAULT = _WHOLE_TOKENS_FIRST

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
    byte_level, own = metadata.get("tokenizer.ggml.model") == "gpt2", own_architecture(metadata)
    if own and byte_level:
        return _byte_level(path, metadata)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory, name = os.path.dirname(path) or ".", os.path.basename(path)
    loader = PreTrainedTokenizerFast if own else AutoTokenizer  # no config for our own
    tokenizer = loader.from_pretrained(directory, gguf_file=name)
    pre = str(metadata.get("tokenizer.ggml.pre", ""))
    if byte_level and PRE_TOKENIZER_SPLITS.get(pre) and pre not in (_transformers_splits() or ()):
        tokenizer.backend_tokenizer.pre_tokenizer = _pre_tokenizer(PRE_TOKENIZER_SPLITS[pre])
    return tokenizer


def _byte_level(path: str, metadata: dict[str, Any]) -> Any:
    """A byte-level BPE from ``tokenizer.ggml.*``, as llama.cpp reads one.

    Raises
    ------
    ValueError
        The vocabulary or merges are missing or not strings, or the tokens
        make no tokenizer (a BOS spelled like template syntax, say).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    tokens, merges = metadata.get("tokenizer.ggml.tokens"), metadata.get("tokenizer.ggml.merges")
    if not _strings(tokens) or not _strings(merges):
        raise ValueError(f"{path}: a byte-level vocabulary needs string lists tokenizer.ggml.tokens and .merges")
    assert isinstance(tokens, list) and isinstance(merges, list)
    types = metadata.get("tokenizer.ggml.token_type")
    kinds = types if isinstance(types, list) and len(types) == len(tokens) else [1] * len(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [_pair(merge) for merge in merges]
    pre = str(metadata.get("tokenizer.ggml.pre", ""))
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        if pre not in ("", "default"):
            _log.warning(
                "%s: tokenizer.ggml.pre %r is not a rule known here: text is split by llama.cpp's default rule, "
                "which may differ from the model's own tokenizer",
                path,
                pre,
            )
        splits = _DEFAULT
    try:
        backend = Tokenizer(
            models.BPE(
                vocab=vocab,
                # llama.cpp keeps a merge whose tokens are missing and never uses it; the tokenizers library refuses it
                merges=[pair for pair in pairs if pair[0] in vocab and pair[1] in vocab and "".join(pair) in vocab],
                ignore_merges=pre in _WHOLE_TOKENS_FIRST,
            )
        )
    except Exception as exc:  # the tokenizers library raises plain Exception
        raise ValueError(f"{path}: tokenizer.ggml.* make no byte-level BPE: {exc}") from None
    backend.pre_tokenizer = _pre_tokenizer(splits)
    backend.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, kinds, strict=True) if k == _CONTROL
    ]
    backend.add_special_tokens(special)
    added = [
        AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, kinds, strict=True) if k == _USER_DEFINED
    ]
    backend.add_tokens(added)
    ids = {
        role: index
        for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
        if type(index := metadata.get(f"tokenizer.ggml.{key}_token_id")) is int and 0 <= index < len(tokens)
    }
    # A role names a token the file marks control or user-defined; a plain token named there stays plain text.
    named = {f"{role}_token": tokens[index] for role, index in ids.items() if kinds[index] in (_CONTROL, _USER_DEFINED)}
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", pre in _BOS_BY_DEFAULT) is True
    add_eos = metadata.get("tokenizer.ggml.add_eos_token") is True
    ends = [(role, ids[role]) for role, wanted in (("bos", add_bos), ("eos", add_eos)) if wanted and role in ids]
    if ends:
        for _, index in ends:
            if not _template_safe(tokens[index]):
                raise ValueError(f"{path}: token {index} {tokens[index]!r} cannot be added around a prompt")
        first = [f"{tokens[ids['bos']]}:0"] if add_bos and "bos" in ids else []
        last = [f"{tokens[ids['eos']]}:0"] if add_eos and "eos" in ids else []
        backend.post_processor = processors.TemplateProcessing(
            single=[*first, "$A:0", *last],
            pair=[*first, "$A:0", *last, *[piece.replace(":0", ":1") for piece in first], "$B:1",
                  *[piece.replace(":0", ":1") for piece in last]],
            special_tokens=[(tokens[index], index) for _, index in ends],
        )  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=backend, **named)


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _template_safe(token: str) -> bool:
    """Whether a token can be named in a ``TemplateProcessing`` piece (not ``$A``-like, no ``:`` or space)."""
    return bool(token) and not token.startswith("$") and ":" not in token and not any(c.isspace() for c in token)


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
