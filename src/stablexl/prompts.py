"""A1111-style prompt syntax: attention weights, BREAK, and prompts longer than 75 tokens.

Syntax (AUTOMATIC1111 stable-diffusion-webui, `modules/prompt_parser.py::parse_prompt_attention`)::

    (text)        weight x 1.1            ((text)) -> x 1.21, nesting multiplies
    [text]        weight / 1.1
    (text:1.5)    explicit weight; the number must follow ':' directly and be made of digits and
                  dots with an optional sign ("(a:1.2e1)" and "(a: 1.5)" are NOT weights: the ':'
                  and the number stay literal text and the group gets x 1.1)
    \\( \\) \\[ \\] \\\\   literal characters; a backslash before anything else is dropped
    BREAK         (upper case, a separate word) ends the current 75-token chunk

Unbalanced brackets follow A1111: a group never closed still multiplies everything after its
opening bracket (round groups first, then square, in opening order); a closer with no open group
of its kind is literal text. Adjacent pieces of exactly equal weight are merged.

Textual-inversion triggers (adapters/embeddings.py) are words of the text: each piece is tokenized with
the `embeddings` table's added words, so "(name:1.2)" weighs every vector of the embedding by 1.2 and a
trigger fills as many token slots as it has vectors (A1111 `sd_hijack_clip.py` counts them the same way).

Not supported (A1111 features of other modules): prompt editing `[a:b:step]`, alternation
`[a|b]`, composable `AND`. Such text is parsed as attention syntax
only, e.g. "[a:b:0.5]" is the literal "a:b:0.5" at weight 1/1.1.

Deliberate deviation: A1111 scales a BREAK marker by the brackets around it (so inside "( ... )"
its weight becomes -1.1 and A1111 then feeds the literal word "BREAK" at weight -1.1 to CLIP). Here
a BREAK marker is always ("BREAK", -1.0) and always breaks the chunk.

Chunking (A1111 `modules/sd_hijack_clip.py::tokenize_line`): each weighted piece is tokenized on
its own; tokens fill chunks of 75. When a chunk is full and the next token is not a comma, and the
chunk's last comma is within `comma_backtrack` tokens of its end (A1111 option
`comma_padding_backtrack`, default 20 in `modules/shared_options.py`), the tokens after that comma
move to the next chunk. BREAK closes the current chunk (even an empty one). Each chunk becomes
[BOS] + tokens + [EOS] + padding = 77 ids; BOS, EOS and padding have weight 1.0. A prompt of
exactly 75 tokens is one chunk, an empty prompt is one (empty) chunk.

Weighting (A1111 `modules/sd_emphasis.py::EmphasisOriginal`, the default "Original" emphasis):
per text encoder and per 77-token chunk, z <- z * w then z <- z * mean(z_before) / mean(z_after).
Chunks of all encoders are concatenated along the token axis; the pooled vector (SDXL) is the one
of the first chunk (`sd_hijack_clip.py::forward` returns `zs[0].pooled`). If one SDXL encoder needs
more chunks than the other (possible because OpenCLIP cuts every "!" out as its pad token), the
shorter list is padded with empty chunks.

API
---
- `parse_weights(text) -> [(text, weight), ...]`, BREAK markers as `BREAK` = ("BREAK", -1.0).
- `needs_weighting(prompt) -> bool`: False for a prompt the plain (diffusers) path encodes
  identically: no syntax, no BREAK, at most 75 tokens. The pipeline keeps the plain path for those.
- `tokenize_weighted(prompt, pad_id) -> (ids (n, 77) long, weights (n, 77) float32)`.
- `encode_prompts_weighted(config, encoders, prompts) -> (context (B, 77 n, C), pooled (B, P) | None)`:
  every prompt is padded to the longest chunk count with encodings of the empty prompt (what
  A1111's `pad_cond_uncond` does between prompt and negative prompt). Encode positive and negative
  prompts in ONE call (prompts + negatives, then split) to get equal lengths.
- `encode_prompt_weighted(config, encoders, prompt) -> (context (1, 77 n, C), pooled (1, P) | None)`.
- `encode_empty_chunk(config, encoders) -> (1, 77, C)` and
  `pad_to_same_length(ctx_a, ctx_b, empty_chunk) -> (ctx_a, ctx_b)` for contexts encoded separately
  (e.g. a plain positive and a long negative prompt).

For a prompt with no syntax and at most 75 tokens, the weighted path gives exactly (bit for bit) the
plain encoding: same ids, and all-1 weights leave the hidden states untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .config import ModelConfig
from .models.clip import CLIPTextModel
from .models.tokenizer import CLIPTokenizer, default_tokenizer

__all__ = [
    "BREAK", "CHUNK_TOKENS", "CHUNK_LENGTH", "COMMA_BACKTRACK",
    "parse_weights", "needs_weighting", "tokenize_weighted",
    "encode_prompt_weighted", "encode_prompts_weighted", "encode_empty_chunk", "pad_to_same_length",
]

BREAK: tuple[str, float] = ("BREAK", -1.0)
CHUNK_TOKENS = 75  # prompt tokens per chunk (sd_hijack_clip.py: chunk_length = 75)
CHUNK_LENGTH = CHUNK_TOKENS + 2  # with BOS and EOS
COMMA_BACKTRACK = 20  # A1111 shared_options.py: "comma_padding_backtrack": OptionInfo(20, ...), slider 0..74
ROUND_FACTOR = 1.1  # prompt_parser.py: round_bracket_multiplier
SQUARE_FACTOR = 1 / 1.1  # prompt_parser.py: square_bracket_multiplier

_ESCAPABLE = "()[]\\"
_SPECIAL = set("\\()[]:")
# An explicit weight: ':' + optional sign + digits/dots + ')' with nothing in between (prompt_parser.py
# accepts exactly `:([+-]?[.\d]+)\)`; anything else after ':' leaves the ':' literal).
_WEIGHT = re.compile(r":([+-]?[0-9.]+)\)")
# BREAK as a whole upper-case word, swallowing the whitespace around it (prompt_parser.py re_break).
_BREAK_WORD = re.compile(r"\s*(?<!\w)BREAK(?!\w)\s*")


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


@dataclass
class _Piece:
    text: str
    weight: float
    is_break: bool = False


def _check_prompt(prompt: object, what: str = "prompt") -> str:
    if not isinstance(prompt, str):
        raise ValueError(
            f"{what} must be a str, got {type(prompt).__name__}; use '' for an empty prompt, not None"
        )
    return prompt


def _parse(text: str) -> list[_Piece]:
    pieces: list[_Piece] = []
    open_round: list[int] = []  # index into `pieces` where each still-open group starts
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        # Multiply in closing order, like A1111, so float results match its output bit for bit.
        for p in pieces[start:]:
            if not p.is_break:
                p.weight *= factor

    def add_text(s: str) -> None:
        parts = _BREAK_WORD.split(s)
        for k, part in enumerate(parts):
            if k:
                pieces.append(_Piece(BREAK[0], BREAK[1], is_break=True))
            pieces.append(_Piece(part, 1.0))

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1 : i + 2]
            if nxt and nxt in _ESCAPABLE:
                pieces.append(_Piece(nxt, 1.0))
                i += 2
            else:  # a backslash escaping nothing vanishes (A1111 keeps text[1:] of the lone "\")
                pieces.append(_Piece("", 1.0))
                i += 1
        elif c == "(":
            open_round.append(len(pieces))
            i += 1
        elif c == "[":
            open_square.append(len(pieces))
            i += 1
        elif c == ":":
            m = _WEIGHT.match(text, i)
            if m is None:
                add_text(":")
                i += 1
            elif open_round:
                try:
                    w = float(m.group(1))
                except ValueError:
                    raise ValueError(
                        f"invalid attention weight {m.group(1)!r} at position {i + 1} of prompt {text!r}: "
                        "write a number such as (word:1.2); escape literal brackets as \\( \\)"
                    ) from None
                scale_from(open_round.pop(), w)
                i = m.end()
            else:  # ":1.5)" with no open "(" is plain text
                add_text(m.group(0))
                i = m.end()
        elif c == ")":
            if open_round:
                scale_from(open_round.pop(), ROUND_FACTOR)
            else:
                add_text(")")
            i += 1
        elif c == "]":
            if open_square:
                scale_from(open_square.pop(), SQUARE_FACTOR)
            else:
                add_text("]")
            i += 1
        else:
            j = i + 1
            while j < n and text[j] not in _SPECIAL:
                j += 1
            add_text(text[i:j])
            i = j

    # Unclosed groups apply to the rest of the prompt: round ones first, then square ones.
    for start in open_round:
        scale_from(start, ROUND_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_FACTOR)

    if not pieces:
        return [_Piece("", 1.0)]
    merged: list[_Piece] = [pieces[0]]
    for p in pieces[1:]:
        last = merged[-1]
        if not p.is_break and not last.is_break and p.weight == last.weight:
            last.text += p.text
        else:
            merged.append(p)
    return merged


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into (text, weight) pieces; BREAK markers are ("BREAK", -1.0).

    >>> parse_weights("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    _check_prompt(text, "text")
    return [(p.text, float(p.weight)) for p in _parse(text)]


# --------------------------------------------------------------------------------------------------
# Tokenization into 77-token chunks
# --------------------------------------------------------------------------------------------------


def _check_backtrack(comma_backtrack: object) -> int:
    ok = isinstance(comma_backtrack, int) and not isinstance(comma_backtrack, bool)
    if not ok or not 0 <= comma_backtrack < CHUNK_TOKENS:
        raise ValueError(
            f"comma_backtrack must be an int in [0, {CHUNK_TOKENS - 1}] (0 disables it), got {comma_backtrack!r}"
        )
    return comma_backtrack


def _chunk_tokens(pieces: list[_Piece], tok: CLIPTokenizer, pad_id: int | None, comma_backtrack: int,
                  added=None) -> list[tuple[list[int], list[float]]]:
    """Weighted pieces -> chunks of at most 75 (token, weight) pairs, without BOS/EOS."""
    comma = tok.encode(",")[0]
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    ws: list[float] = []
    last_comma = -1  # position of the last comma in the current chunk

    def close(keep: int | None = None) -> None:
        """Emit the current chunk (its first `keep` tokens) and start a new one with the rest."""
        nonlocal ids, ws, last_comma
        keep = len(ids) if keep is None else keep
        chunks.append((ids[:keep], ws[:keep]))
        ids, ws = ids[keep:], ws[keep:]
        last_comma = -1

    for piece in pieces:
        if piece.is_break:
            close()
            continue
        for t in tok.encode(piece.text, pad_id=pad_id, added=added):
            if t == comma:
                last_comma = len(ids)
            elif (comma_backtrack and len(ids) == CHUNK_TOKENS and last_comma >= 0
                  and CHUNK_TOKENS - last_comma <= comma_backtrack):
                close(keep=last_comma + 1)  # the words after the comma move to the next chunk
            if len(ids) == CHUNK_TOKENS:
                close()
            ids.append(t)
            ws.append(piece.weight)
    if ids or not chunks:
        close()
    return chunks


def tokenize_weighted(prompt: str, pad_id: int, *, comma_backtrack: int = COMMA_BACKTRACK,
                      tokenizer: CLIPTokenizer | None = None, added=None) -> tuple[Tensor, Tensor]:
    """Prompt -> (ids (n_chunks, 77) long, weights (n_chunks, 77) float32).

    Each row is [BOS] + up to 75 tokens + [EOS], right-padded with `pad_id` (EOS for CLIP-L, 0 for
    OpenCLIP); BOS, EOS and padding weigh 1.0. `pad_id` is also passed to the tokenizer so that,
    as in diffusers' OpenCLIP tokenizer, every "!" becomes the pad token when pad_id is 0. `added`: the
    tokenizer's AddedTokens (textual-inversion triggers).
    """
    _check_prompt(prompt)
    comma_backtrack = _check_backtrack(comma_backtrack)
    tok = tokenizer or default_tokenizer()
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < tok.vocab_size:
        raise ValueError(
            f"pad_id must be an int token id in [0, {tok.vocab_size}) (the encoder's TextEncoderSpec.pad_id: "
            f"{tok.EOS} for CLIP-L, 0 for OpenCLIP), got {pad_id!r}"
        )
    chunks = _chunk_tokens(_parse(prompt), tok, pad_id, comma_backtrack, added)
    ids = torch.full((len(chunks), CHUNK_LENGTH), pad_id, dtype=torch.long)
    weights = torch.ones((len(chunks), CHUNK_LENGTH), dtype=torch.float32)
    for row, (cids, cws) in enumerate(chunks):
        k = len(cids)
        ids[row, 0] = tok.BOS
        ids[row, 1 : k + 1] = torch.tensor(cids, dtype=torch.long)
        ids[row, k + 1] = tok.EOS
        weights[row, 1 : k + 1] = torch.tensor(cws, dtype=torch.float32)
    return ids, weights


def needs_weighting(prompt: str, *, tokenizer: CLIPTokenizer | None = None, added=None) -> bool:
    """True if the prompt has attention syntax or BREAK, or more than 75 tokens.

    A prompt for which this is False is encoded identically by the plain path (one 77-token
    sequence, diffusers-style) and by `encode_prompt_weighted`. Escapes count as syntax: "\\(" must
    become "(" before tokenizing. Token count is taken without the OpenCLIP "!" split (the larger).
    """
    _check_prompt(prompt)
    if [(p.text, p.weight, p.is_break) for p in _parse(prompt)] != [(prompt, 1.0, False)]:
        return True
    tok = tokenizer or default_tokenizer()
    return len(tok.encode(prompt, added=added)) > CHUNK_TOKENS


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def _apply_weights(z: Tensor, w: Tensor) -> Tensor:
    """A1111 "Original" emphasis for each chunk: scale tokens, then restore the chunk's mean.

    z (N, 77, C) hidden states of N chunks, w (N, 77). Computed in float32, returned in z's dtype.
    A chunk whose weights are all 1 is returned unchanged (A1111's ratio is exactly 1 there too).
    """
    if bool((w == 1).all()):
        return z
    zf = z.float()
    before = zf.mean(dim=(1, 2), keepdim=True)  # (N, 1, 1)
    scaled = zf * w.to(zf.device, torch.float32)[:, :, None]
    after = scaled.mean(dim=(1, 2), keepdim=True)
    # A1111 divides unconditionally; guard the degenerate zero-mean case instead of making inf/nan.
    degenerate = after == 0
    ratio = torch.where(degenerate, torch.ones_like(after), before / torch.where(degenerate, torch.ones_like(after), after))
    return (scaled * ratio).to(z.dtype)


def _encoder_device(enc: CLIPTextModel) -> torch.device:
    return enc.embeddings.token_embedding.weight.device


def encode_prompts_weighted(config: ModelConfig, encoders: Sequence[CLIPTextModel], prompts: Sequence[str], *,
                            comma_backtrack: int = COMMA_BACKTRACK, tokenizer: CLIPTokenizer | None = None,
                            embeddings=None) -> tuple[Tensor, Tensor | None]:
    """Prompts -> (context (B, 77 n, C), pooled (B, P) or None), n = the largest chunk count.

    Every prompt (and every encoder of a prompt) is padded to n chunks with empty-prompt chunks,
    which encode exactly like the empty prompt "". Context features are the encoders' hidden states
    concatenated in encoder order (as `conditioning.encode_text`); pooled comes from chunk 0.
    `embeddings`: textual inversions (an adapters.embeddings.EmbeddingTable: its `tokens` and per-encoder
    `vectors`), or None.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(
            f"prompts must be a list of str, got {type(prompts).__name__}; use encode_prompt_weighted for one prompt"
        )
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt ('' for an empty one)")
    for k, p in enumerate(prompts):
        _check_prompt(p, f"prompts[{k}]")
    if len(encoders) != len(config.text_encoders):
        raise ValueError(f"{config.name} has {len(config.text_encoders)} text encoders; got {len(encoders)}")
    tok = tokenizer or default_tokenizer()
    added = None if embeddings is None else embeddings.tokens
    extra = [None] * len(encoders) if embeddings is None else embeddings.vectors

    per_encoder: list[list[tuple[Tensor, Tensor]]] = []  # [encoder][prompt] -> (ids, weights)
    for spec in config.text_encoders:
        per_encoder.append([tokenize_weighted(p, spec.pad_id, comma_backtrack=comma_backtrack, tokenizer=tok,
                                              added=added) for p in prompts])
    n = max(ids.shape[0] for enc_rows in per_encoder for ids, _ in enc_rows)

    b = len(prompts)
    hiddens, pooled = [], None
    for spec, enc, rows, vectors in zip(config.text_encoders, encoders, per_encoder, extra):
        empty_ids, empty_w = tokenize_weighted("", spec.pad_id, tokenizer=tok)
        ids = torch.cat([torch.cat([r_ids] + [empty_ids] * (n - r_ids.shape[0])) for r_ids, _ in rows])  # (B n, 77)
        ws = torch.cat([torch.cat([r_w] + [empty_w] * (n - r_w.shape[0])) for _, r_w in rows])
        out = enc(ids.to(_encoder_device(enc)), layer=spec.layer, final_norm=spec.final_norm, pooled=spec.pooled,
                  extra=vectors)
        z = _apply_weights(out.hidden, ws)  # (B n, 77, C_enc)
        hiddens.append(z.reshape(b, n * CHUNK_LENGTH, z.shape[-1]))
        if spec.pooled:
            assert out.pooled is not None
            pooled = out.pooled.reshape(b, n, -1)[:, 0]  # first chunk (A1111 zs[0].pooled)
    return torch.cat(hiddens, dim=-1), pooled


def encode_prompt_weighted(config: ModelConfig, encoders: Sequence[CLIPTextModel], prompt: str, *,
                           comma_backtrack: int = COMMA_BACKTRACK, tokenizer: CLIPTokenizer | None = None,
                           ) -> tuple[Tensor, Tensor | None]:
    """One prompt -> (context (1, 77 n_chunks, C), pooled (1, P) or None)."""
    _check_prompt(prompt)
    return encode_prompts_weighted(config, encoders, [prompt], comma_backtrack=comma_backtrack, tokenizer=tokenizer)


def encode_empty_chunk(config: ModelConfig, encoders: Sequence[CLIPTextModel], *,
                       tokenizer: CLIPTokenizer | None = None) -> Tensor:
    """The context (1, 77, C) of the empty prompt: the padding chunk of `pad_to_same_length`."""
    return encode_prompts_weighted(config, encoders, [""], tokenizer=tokenizer)[0]


def pad_to_same_length(ctx_a: Tensor, ctx_b: Tensor, empty_chunk: Tensor) -> tuple[Tensor, Tensor]:
    """Append empty-prompt chunks to the shorter of two contexts (B, 77 k, C) until both match.

    `empty_chunk` is (1, 77, C) (see `encode_empty_chunk`); like A1111's `pad_cond` it is repeated
    along the token axis and broadcast over the batch.
    """
    for name, t in (("ctx_a", ctx_a), ("ctx_b", ctx_b)):
        if t.ndim != 3 or t.shape[1] % CHUNK_LENGTH:
            raise ValueError(f"{name} must be (B, 77 k, C); got {tuple(t.shape)}")
    if empty_chunk.ndim != 3 or empty_chunk.shape[:2] != (1, CHUNK_LENGTH):
        raise ValueError(f"empty_chunk must be (1, 77, C); got {tuple(empty_chunk.shape)}")
    if not ctx_a.shape[2] == ctx_b.shape[2] == empty_chunk.shape[2]:
        raise ValueError(
            f"feature widths differ: ctx_a {ctx_a.shape[2]}, ctx_b {ctx_b.shape[2]}, empty_chunk {empty_chunk.shape[2]}"
        )

    def pad(t: Tensor, chunks: int) -> Tensor:
        if chunks == 0:
            return t
        fill = empty_chunk.to(t.device, t.dtype).repeat(1, chunks, 1).expand(t.shape[0], -1, -1)
        return torch.cat([t, fill], dim=1)

    diff = (ctx_a.shape[1] - ctx_b.shape[1]) // CHUNK_LENGTH
    return pad(ctx_a, max(0, -diff)), pad(ctx_b, max(0, diff))
