"""CLIP byte-level BPE tokenizer (the text tokenizer of SD 1.x / 2.x / SDXL).

Written from scratch.  Behaviour is matched, id for id, to the reference that
diffusers uses: ``transformers.CLIPTokenizer`` (transformers 5.x, backed by the
Rust ``tokenizers`` library).  The facts it relies on come from reading
``transformers/models/clip/tokenization_clip.py`` (5.23.0) and from probing
that tokenizer; ``tests/models/test_tokenizer.py`` checks the parity.

Pipeline of the reference, reproduced step by step below:

1. Special-token literals are cut out of the *raw* text first (they are
   "added tokens" with ``normalized=False``; leftmost-longest, case-sensitive):
   ``<|startoftext|>`` -> 49406, ``<|endoftext|>`` -> 49407, and the encoder's
   pad token (``"!"`` for OpenCLIP, see ``_pad_literal``).
2. Each remaining segment is normalised on its own: NFC, every run of
   whitespace -> one space, then lower-casing *character by character*
   (Rust ``char::to_lowercase``, so a word-final capital sigma becomes "σ",
   not "ς" as Python's ``str.lower`` would give).  No ftfy, no HTML
   unescaping, no strip step.  The Unicode versions of the reference's
   tables differ from Python's; see "Unicode-version alignment" below.
3. Pre-split with the CLIP regex (``_unicode_patterns``, case-sensitive; whitespace
   between matches is dropped).  A piece equal to a special literal can only
   appear here after lower-casing (e.g. ``<|EndOfText|>``); the reference then
   re-splits it with GPT-2's byte-level regex into ``<|``, letters, ``|>``.
4. Each piece is UTF-8 encoded, mapped byte -> printable unicode char (the
   GPT-2 / CLIP ``bytes_to_unicode`` table) and BPE-merged with ``</w>``
   appended to its last symbol.

Differences from OpenAI's / OpenCLIP's ``SimpleTokenizer`` (which CLIP was
trained with): those run ``ftfy.fix_text`` and ``html.unescape`` twice before
whitespace cleaning, use ``str.lower`` (final sigma -> "ς"), match the regex
with IGNORECASE, and map a lower-cased ``<|endoftext|>`` piece straight to
its special id.  diffusers does none of that, so neither do we: ``"&amp;"``
stays three tokens ``& amp ;`` and mojibake is not repaired.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import numbers
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from types import SimpleNamespace

import torch

__all__ = ["AddedTokens", "CLIPTokenizer", "default_tokenizer"]

_ASSET_NAME = "bpe_simple_vocab_16e6.txt.gz"
_BOS_TOKEN = "<|startoftext|>"
_EOS_TOKEN = "<|endoftext|>"
_END_OF_WORD = "</w>"

# Vocabulary layout (OpenAI CLIP ``simple_tokenizer.py``, identical in
# open_clip): 256 byte symbols, the same 256 with "</w>", one entry per merge,
# then the two specials -> 49408 ids.
_NUM_MERGES = 49152 - 256 - 2  # 48894 merge lines follow the header line
_VOCAB_SIZE = 2 * 256 + _NUM_MERGES + 2

# --------------------------------------------------------------------------
# Unicode-version alignment.  The reference's Rust components carry their own
# Unicode tables, none of which is Python 3.11's (unicodedata 14.0) nor the
# `regex` package's (17.0).  Found by sweeping every code point through both
# tokenizers (tokenizers 0.23.3); the tables below are the resulting deltas,
# expressed as Unicode facts.
#
# (a) NFC: the reference normalises with Unicode 9.0 data.  Characters added
#     since then are, to it, inert starters (combining class 0, no
#     decomposition, never composed).  These are the ones among them whose
#     normalisation data is not trivial (non-zero combining class, canonical
#     decomposition or second half of a composition: 10.0-14.0 checked
#     against the reference, 15.0-17.0 taken from `regex`'s Unicode data).
_NFC_INERT_RANGES = (
    (0x5c8, 0x5c9), (0x7fd, 0x7fd), (0x897, 0x89f), (0x8ca, 0x8d3), (0x9fe, 0x9fe),
    (0xc3c, 0xc3c), (0xd3b, 0xd3c), (0xeba, 0xeba), (0x1715, 0x1715), (0x1abf, 0x1af0),
    (0x1df6, 0x1dfa), (0xa82c, 0xa82c), (0x105c9, 0x105c9), (0x105e4, 0x105e4),
    (0x10d24, 0x10d27), (0x10d69, 0x10d6d), (0x10eab, 0x10eac), (0x10ecb, 0x10ecf),
    (0x10ef0, 0x10efb), (0x10efd, 0x10eff), (0x10f46, 0x10f50), (0x10f82, 0x10f85),
    (0x11070, 0x11070), (0x1133b, 0x1133b), (0x11383, 0x11383), (0x11385, 0x11385),
    (0x1138e, 0x1138e), (0x11391, 0x11391), (0x113b8, 0x113b8), (0x113bb, 0x113bb),
    (0x113c2, 0x113c2), (0x113c5, 0x113c5), (0x113c7, 0x113c9), (0x113ce, 0x113d0),
    (0x1145e, 0x1145e), (0x11839, 0x1183a), (0x11930, 0x11930), (0x11935, 0x11935),
    (0x11938, 0x11938), (0x1193d, 0x1193e), (0x11943, 0x11943), (0x119e0, 0x119e0),
    (0x11a34, 0x11a34), (0x11a47, 0x11a47), (0x11a99, 0x11a99), (0x11d42, 0x11d42),
    (0x11d44, 0x11d45), (0x11d97, 0x11d97), (0x11f41, 0x11f42), (0x1611e, 0x16129),
    (0x1612f, 0x1612f), (0x16d67, 0x16d6a), (0x16ff0, 0x16ff1), (0x1d127, 0x1d128),
    (0x1d250, 0x1d252), (0x1d25b, 0x1d25c), (0x1d25f, 0x1d25f), (0x1d280, 0x1d281),
    (0x1e08f, 0x1e08f), (0x1e130, 0x1e136), (0x1e2ae, 0x1e2ae), (0x1e2ec, 0x1e2ef),
    (0x1e4ec, 0x1e4ef), (0x1e5ee, 0x1e5ef), (0x1e6e3, 0x1e6e3), (0x1e6e6, 0x1e6e6),
    (0x1e6ee, 0x1e6ef), (0x1e6f5, 0x1e6f5),
)
# (b) Lower-casing is Rust's ``char::to_lowercase`` (Unicode 17.0): the case
#     pairs added in Unicode 16.0 / 17.0, unknown to Python 3.11.
_LOWER_EXTRA: dict[int, int] = {
    0x1C89: 0x1C8A, 0xA7CB: 0x0264, 0xA7CC: 0xA7CD, 0xA7CE: 0xA7CF, 0xA7D2: 0xA7D3,
    0xA7D4: 0xA7D5, 0xA7DA: 0xA7DB, 0xA7DC: 0x019B,
    **{c: c + 0x20 for c in range(0x10D50, 0x10D66)},  # Garay
    **{c: c + 0x1B for c in range(0x16EA0, 0x16EB9)},  # Beria Erfe
}
# (c) The pre-split regex runs on Oniguruma with Unicode 16.0 tables, so the
#     letters / numbers first assigned in Unicode 17.0 are not \p{L} / \p{N}
#     there (they fall into the "other symbols" class).
_UNICODE17_LN_RANGES = (
    (0x558, 0x558), (0x58b, 0x58c), (0x88f, 0x88f), (0xc5c, 0xc5c), (0xcdc, 0xcdc),
    (0x208f, 0x208f), (0x209d, 0x209f), (0xa7ce, 0xa7cf), (0xa7d2, 0xa7d2),
    (0xa7d4, 0xa7d4), (0xa7dd, 0xa7dd), (0xa7e2, 0xa7e2), (0xa7f1, 0xa7f1),
    (0xab6c, 0xab6d), (0x107bb, 0x107bf), (0x10940, 0x10959), (0x10ec5, 0x10ec7),
    (0x10ed9, 0x10eee), (0x11b0a, 0x11b0a), (0x11db0, 0x11ddb), (0x11de0, 0x11de9),
    (0x11df1, 0x11df1), (0x1246f, 0x1246f), (0x12475, 0x1247f), (0x12550, 0x12686),
    (0x16ea0, 0x16eb8), (0x16ebb, 0x16ed3), (0x16ff2, 0x16ff6), (0x187f8, 0x187ff),
    (0x18cd6, 0x18cda), (0x18d09, 0x18d20), (0x18d80, 0x18df2), (0x18e00, 0x19191),
    (0x191a0, 0x191d2), (0x1b123, 0x1b128), (0x1b168, 0x1b168), (0x1d6a6, 0x1d6a6),
    (0x1df1f, 0x1df24), (0x1df2b, 0x1df81), (0x1df90, 0x1df96), (0x1dfcd, 0x1dfff),
    (0x1e6c0, 0x1e6de), (0x1e6e0, 0x1e6e2), (0x1e6e4, 0x1e6e5), (0x1e6e7, 0x1e6ed),
    (0x1e6f0, 0x1e6f4), (0x1e6fe, 0x1e6ff), (0x2b73a, 0x2b73f), (0x2b81e, 0x2b81e),
    (0x2cea2, 0x2cead), (0x323b0, 0x33479), (0x3d000, 0x3fc3f),
)


def _char_class(ranges: Iterable[tuple[int, int]]) -> str:
    return "[" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges) + "]"


# Whitespace as understood by Oniguruma's ``\s`` (Unicode White_Space).
# Spelled out because Python's notion differs: ``str.isspace`` / ``re``'s
# ``\s`` also accept U+001C..U+001F, which the reference keeps as symbols.
_WS = (
    "\\t\\n\\x0b\\x0c\\r\\x20\\x85\\xa0\\u1680\\u2000-\\u200a"
    "\\u2028\\u2029\\u202f\\u205f\\u3000"
)


@functools.cache
def _unicode_patterns() -> SimpleNamespace:
    """The patterns for text with non-ASCII characters. They need the `regex` package (Unicode
    properties, set difference), whose import and compilation take ~0.2 s: done on first use only."""
    import regex

    u17 = _char_class(_UNICODE17_LN_RANGES)
    return SimpleNamespace(
        ws_run=regex.compile(f"[{_WS}]+"),
        nfc_inert_split=regex.compile(f"({_char_class(_NFC_INERT_RANGES)})"),
        # CLIP pre-split pattern (OpenAI CLIP ``simple_tokenizer.py``; same string in transformers), with
        # \s / \p{L} / \p{N} narrowed as explained above (V1 syntax for set difference).  No IGNORECASE:
        # the reference matches it case-sensitively on lower-cased text, which matters for e.g. "'ſ"
        # (long s), that IGNORECASE would take as the contraction "'s".
        pre_split=regex.compile(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
            rf"|[\p{{L}}--{u17}]+|[\p{{N}}--{u17}]|[[^{_WS}\p{{L}}\p{{N}}]{u17}]+",
            flags=regex.V1,
        ),
    )


# The same two patterns restricted to ASCII text, where they need no Unicode tables: the ASCII
# whitespace of ``_WS``, \p{L} = [A-Za-z], \p{N} = [0-9]. Equality with the patterns above on ASCII
# text is tested (tests/models/test_tokenizer.py).
_ASCII_WS = "\t\n\x0b\x0c\r "
_ASCII_WS_RUN = re.compile(f"[{_ASCII_WS}]+")
_ASCII_PRE_SPLIT = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
    rf"|[A-Za-z]+|[0-9]|[^{_ASCII_WS}A-Za-z0-9]+"
)

# What GPT-2's byte-level split (the reference's ``ByteLevel`` pre-tokenizer,
# ``use_regex=True``) does to a lower-cased special literal: "<|", word, "|>".
# On every other piece it is a no-op.
_SPECIAL_RESPLIT = {
    lit: ("<|", lit[2:-2], "|>") for lit in (_BOS_TOKEN, _EOS_TOKEN)
}

class AddedTokens:
    """Words that stand for token ids past the vocabulary (textual-inversion triggers), each a run of ids.

    Matched in the raw text case-insensitively (the reference lower-cases before matching added tokens) and
    only as whole words: not inside a longer run of letters, digits or '_' (A1111 matches the name's token
    ids, so "catlike" never triggers "cat"). The longest word wins where several start at one place, so
    "embedding:name" is one trigger. The shipped vocabulary is never changed; the ids index vectors that the
    text encoder is given alongside (`CLIPTextModel.forward(extra=...)`).
    """

    def __init__(self, words: dict[str, tuple[int, ...]]):
        self.ids = {w.lower(): tuple(ids) for w, ids in words.items() if w}
        alternatives = sorted(self.ids, key=len, reverse=True)
        self.pattern = re.compile("(?<!\\w)(" + "|".join(re.escape(a) for a in alternatives) + ")(?!\\w)",
                                  re.IGNORECASE) if alternatives else None

    def __bool__(self) -> bool:
        return self.pattern is not None

    def split(self, text: str) -> list[str | tuple[int, ...]]:
        """`text` as plain segments and the id runs of the words found in it."""
        if self.pattern is None:
            return [text]
        out: list[str | tuple[int, ...]] = []
        for i, part in enumerate(self.pattern.split(text)):
            if i % 2:
                out.append(self.ids[part.lower()])
            elif part:
                out.append(part)
        return out


# Plain dict cache of BPE results; cleared when it grows past this many words
# so a long-running process cannot grow without bound.
_CACHE_LIMIT = 200_000


def _bytes_to_unicode() -> list[str]:
    """Byte value -> printable char table of GPT-2 / CLIP.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in
    increasing order, to U+0100, U+0101, ...
    """
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: list[str] = [""] * 256
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _nfc(text: str) -> str:
    """NFC as the reference computes it (Unicode 9.0 data, see (a) above)."""
    if text.isascii():
        return text
    parts = _unicode_patterns().nfc_inert_split.split(text)
    if len(parts) == 1:
        return unicodedata.normalize("NFC", text)
    # An inert starter blocks reordering and composition across it, so NFC
    # can be applied to the runs between them independently.
    return "".join(
        part if i % 2 else unicodedata.normalize("NFC", part) for i, part in enumerate(parts)
    )


def _lower(text: str) -> str:
    """Per-character lower-casing, like Rust's ``char::to_lowercase``."""
    if text.isascii():
        return text.lower()
    # ``str.lower`` differs from per-character lowering only by the one
    # context-sensitive rule CPython implements (Final_Sigma: "Σ" -> "ς" at
    # a word end); the reference always gives "σ".
    return text.translate(_LOWER_EXTRA).replace("Σ", "σ").lower()


def _normalize(text: str) -> str:
    # Order of the reference's normalizer sequence: NFC, whitespace, lower.
    # There is no strip step; leading / trailing spaces vanish at pre-split.
    ws_run = _ASCII_WS_RUN if text.isascii() else _unicode_patterns().ws_run  # _nfc and _lower take ASCII shortcuts
    return _lower(ws_run.sub(" ", _nfc(text)))


def _pre_split(normalized: str) -> list[str]:
    """Step 3: the pieces of a normalised segment."""
    pattern = _ASCII_PRE_SPLIT if normalized.isascii() else _unicode_patterns().pre_split
    return pattern.findall(normalized)


def _read_merge_lines(path: str | os.PathLike | None) -> list[str]:
    if path is None:
        asset = importlib.resources.files("stablexl").joinpath("assets").joinpath(_ASSET_NAME)
        data = asset.read_bytes()
    else:
        with open(path, "rb") as fh:
            data = fh.read()
    if data[:2] == b"\x1f\x8b":  # gzip magic; a plain-text copy is accepted too
        data = gzip.decompress(data)
    return data.decode("utf-8").split("\n")


class CLIPTokenizer:
    """CLIP BPE tokenizer, id-for-id compatible with diffusers' tokenizers.

    ``tok(texts, pad_id=...)`` gives the ``(B, max_length)`` id tensor that
    ``transformers.CLIPTokenizer(..., padding="max_length", max_length=77,
    truncation=True)`` gives.  ``pad_id`` depends on the text encoder:
    ``CLIPTokenizer.EOS`` (49407) for OpenAI CLIP-L (SD 1.x, SDXL
    ``tokenizer``), ``0`` (the token "!") for OpenCLIP (SD 2.x, SDXL
    ``tokenizer_2``).
    """

    BOS: int = 49406
    EOS: int = 49407
    MAX_LENGTH: int = 77

    def __init__(self, vocab_path: str | os.PathLike | None = None):
        lines = _read_merge_lines(vocab_path)
        merge_lines = lines[1 : 1 + _NUM_MERGES]  # line 0 is a version header
        merges = [tuple(line.split(" ")) for line in merge_lines]
        for line, m in zip(merge_lines, merges):
            if len(m) != 2:
                raise ValueError(
                    f"{vocab_path or _ASSET_NAME!s}: malformed merge line {line!r}; expected "
                    f"a CLIP 'bpe_simple_vocab_16e6.txt(.gz)' file with {_NUM_MERGES} merges"
                )
        if len(merges) != _NUM_MERGES:
            raise ValueError(
                f"{vocab_path or _ASSET_NAME!s}: found {len(merges)} merges, need {_NUM_MERGES}; "
                "pass the CLIP 'bpe_simple_vocab_16e6.txt.gz' file (or None for the packaged copy)"
            )

        byte_chars = _bytes_to_unicode()
        # Vocabulary order of the byte symbols is the reference's dict order:
        # the 188 printable bytes (ascending) first, then the 68 remapped ones.
        base = sorted(byte_chars, key=ord)
        tokens = base + [c + _END_OF_WORD for c in base]
        tokens += [a + b for a, b in merges]
        tokens += [_BOS_TOKEN, _EOS_TOKEN]
        assert len(tokens) == _VOCAB_SIZE

        self._id_to_token: list[str] = tokens
        self._token_to_id: dict[str, int] = dict(zip(tokens, range(len(tokens))))
        if len(self._token_to_id) != len(tokens):
            raise ValueError(f"{vocab_path or _ASSET_NAME!s}: duplicate vocabulary entries")
        self._ranks: dict[tuple[str, str], int] = dict(zip(merges, range(len(merges))))
        self._byte_to_char: list[str] = byte_chars
        self._char_to_byte: dict[str, int] = {c: b for b, c in enumerate(byte_chars)}
        self._bpe_cache: dict[str, tuple[int, ...]] = {}
        # Literal splitters for the raw text, keyed by the extra pad literal.
        self._literal_splitters: dict[str | None, re.Pattern] = {}

    # ------------------------------------------------------------------ basics
    def vocab_and_merges(self) -> tuple[dict[str, int], list[str]]:
        """Token -> id and the merge lines ("a b", in rank order): the vocab.json / merges.txt of a
        transformers tokenizer folder for this vocabulary."""
        return dict(self._token_to_id), [f"{a} {b}" for a, b in self._ranks]

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def _check_id(self, value: object, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(
                f"{what} must be an int token id in [0, {self.vocab_size}), got {value!r}"
            )
        value = int(value)
        if not 0 <= value < self.vocab_size:
            hint = (
                f"; use CLIPTokenizer.EOS ({self.EOS}) for OpenAI CLIP-L or 0 for OpenCLIP"
                if what == "pad_id"
                else ""
            )
            raise ValueError(f"{what}={value} is outside the vocabulary [0, {self.vocab_size}){hint}")
        return value

    # --------------------------------------------------------------------- BPE
    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-split piece (cached per piece)."""
        cached = self._bpe_cache.get(piece)
        if cached is not None:
            return cached
        b2c = self._byte_to_char
        symbols = [b2c[b] for b in piece.encode("utf-8")]
        symbols[-1] += _END_OF_WORD
        ranks = self._ranks
        # Classic BPE: repeatedly merge every occurrence (left to right) of the
        # lowest-ranked adjacent pair.  With this merge table (each merge only
        # uses symbols created by earlier merges) it gives the same result as
        # the priority-queue variant in ``tokenizers``.
        while len(symbols) > 1:
            best_rank = None
            best = None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, pair
            if best is None:
                break
            first, second = best
            merged = first + second
            out: list[str] = []
            i, n = 0, len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            symbols = out
        ids = tuple(self._token_to_id[s] for s in symbols)
        if len(self._bpe_cache) >= _CACHE_LIMIT:
            self._bpe_cache.clear()
        self._bpe_cache[piece] = ids
        return ids

    def _encode_segment(self, segment: str, out: list[int]) -> None:
        """Append the ids of a text segment free of special literals."""
        for piece in _pre_split(_normalize(segment)):
            resplit = _SPECIAL_RESPLIT.get(piece)
            if resplit is None:
                out.extend(self._bpe(piece))
            else:
                for sub in resplit:
                    out.extend(self._bpe(sub))

    def _pad_literal(self, pad_id: int | None) -> str | None:
        # transformers registers the pad token as a special added token with
        # ``normalized=False``: its literal text is cut out of the raw prompt
        # like <|endoftext|>.  For OpenCLIP (pad "!" = id 0) this means every
        # "!" in a prompt becomes a standalone id 0 ("!!!" -> 0, 0, 0 instead
        # of the merged "!!!</w>"), exactly as diffusers' SDXL tokenizer_2 does.
        if pad_id is None or pad_id in (self.BOS, self.EOS):
            return None
        return self._id_to_token[pad_id]

    def _literal_splitter(self, pad_literal: str | None) -> re.Pattern:
        splitter = self._literal_splitters.get(pad_literal)
        if splitter is None:
            literals = {_BOS_TOKEN: self.BOS, _EOS_TOKEN: self.EOS}
            if pad_literal is not None:
                literals.setdefault(pad_literal, self._token_to_id[pad_literal])
            # Leftmost match wins, longest literal first among those starting
            # at the same position (the reference uses leftmost-longest
            # Aho-Corasick).
            alternatives = sorted(literals, key=len, reverse=True)
            splitter = re.compile("(" + "|".join(re.escape(a) for a in alternatives) + ")")
            self._literal_splitters[pad_literal] = splitter
        return splitter

    def _encode(self, text: str, pad_literal: str | None, added: AddedTokens | None = None) -> list[int]:
        out: list[int] = []
        if not text:
            return out
        parts = self._literal_splitter(pad_literal).split(text)
        # re.split with one capture group alternates: text, literal, text, ...
        for i, part in enumerate(parts):
            if i % 2:
                out.append(self._token_to_id[part])
            elif part and added:  # added words are cut out like literals; the text between is encoded alone
                for piece in added.split(part):
                    if isinstance(piece, tuple):
                        out.extend(piece)
                    else:
                        self._encode_segment(piece, out)
            elif part:
                self._encode_segment(part, out)
        return out

    # --------------------------------------------------------------- public API
    def encode(self, text: str, *, pad_id: int | None = None, added: AddedTokens | None = None) -> list[int]:
        """BPE ids of ``text`` without BOS/EOS and without truncation.

        Literal ``<|startoftext|>`` / ``<|endoftext|>`` in the text map to
        their special ids.  Pass the encoder's ``pad_id`` to also reproduce
        the pad-literal split that ``__call__`` applies (only differs for a pad
        token other than EOS, i.e. "!" for OpenCLIP); ``added`` maps extra words
        (textual-inversion triggers) to their ids past the vocabulary.
        """
        if not isinstance(text, str):
            raise ValueError(
                f"text must be a str, got {type(text).__name__}; convert the prompt with str() "
                "or pass a list of str to __call__"
            )
        if pad_id is not None:
            pad_id = self._check_id(pad_id, "pad_id")
        _check_encodable(text)
        return self._encode(text, self._pad_literal(pad_id), added)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` ("</w>" becomes a space; result is stripped).

        Mirrors ``transformers.CLIPTokenizer.decode`` (with
        ``clean_up_tokenization_spaces`` off): invalid UTF-8 byte sequences
        become U+FFFD.  Special tokens are kept unless ``skip_special_tokens``
        is set, which drops BOS and EOS (hence EOS padding, but not the "!"
        padding of OpenCLIP, id 0, which is an ordinary token here).
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(
                    f"decode expects a 1-D sequence of ids, got a tensor of shape "
                    f"{tuple(ids.shape)}; decode one row at a time"
                )
            ids = ids.tolist()
        c2b = self._char_to_byte
        kept: list[str] = []
        for raw in ids:
            i = self._check_id(raw, "token id")
            if not (skip_special_tokens and i in (self.BOS, self.EOS)):
                kept.append(self._id_to_token[i])
        # Like the reference: map every char of the concatenated tokens back
        # to its byte (the ASCII of the special tokens maps to itself), decode
        # UTF-8 leniently, and only then turn "</w>" into a space.
        data = bytes(c2b[c] for c in "".join(kept))
        return data.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ").strip()

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        pad_id: int,
        max_length: int = MAX_LENGTH,
        added: AddedTokens | None = None,
    ) -> torch.LongTensor:
        """Tokenize a prompt or a batch of prompts to a ``(B, max_length)`` tensor.

        Each row is ``[BOS] + ids[: max_length - 2] + [EOS]`` right-padded with
        ``pad_id``; ``added`` as in ``encode``.
        """
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, Sequence):
            raise ValueError(
                f"texts must be a str or a list of str, got {type(texts).__name__}; "
                "wrap a single prompt as [prompt]"
            )
        for k, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(
                    f"texts[{k}] must be a str, got {type(t).__name__}; convert prompts with str() "
                    "(use '' for an empty / negative prompt, not None)"
                )
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(
                f"max_length must be an int >= 2 (room for BOS and EOS), got {max_length!r}; "
                f"CLIP text encoders use {self.MAX_LENGTH}"
            )
        pad_id = self._check_id(pad_id, "pad_id")
        pad_literal = self._pad_literal(pad_id)
        out = torch.full((len(texts), max_length), pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            _check_encodable(text)
            ids = self._encode(text, pad_literal, added)[: max_length - 2]
            seq = [self.BOS, *ids, self.EOS]
            out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return out


def _check_encodable(text: str) -> None:
    # Lone surrogates (e.g. from a bad decode with errors="surrogateescape")
    # cannot be UTF-8 encoded; transformers rejects them too (TypeError).
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"prompt contains a character that is not valid Unicode text ({err.reason} at "
            f"index {err.start}); decode your input with errors='replace' first"
        ) from None


@functools.lru_cache(maxsize=None)
def default_tokenizer() -> CLIPTokenizer:
    """Shared tokenizer built from the packaged vocabulary (loaded once)."""
    return CLIPTokenizer()
