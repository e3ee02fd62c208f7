"""A1111 prompt syntax: parsing, 75-token chunking, and weighted encoding.

Expected parse results are what AUTOMATIC1111's `modules/prompt_parser.py::parse_prompt_attention`
returns (its docstring's doctest examples are included verbatim as inputs/outputs); chunking follows
`modules/sd_hijack_clip.py::tokenize_line` with the default `comma_padding_backtrack` = 20.
"""

from __future__ import annotations

import pytest
import torch

from stablexl.config import preset
from stablexl.models.conditioning import encode_text
from stablexl.models.parts import build_parts
from stablexl.models.tokenizer import default_tokenizer
from stablexl.prompts import (
    BREAK, CHUNK_LENGTH, COMMA_BACKTRACK, encode_empty_chunk, encode_prompt_weighted, encode_prompts_weighted,
    needs_weighting, pad_to_same_length, parse_weights, tokenize_weighted,
)

BOS, EOS = 49406, 49407
TOK = default_tokenizer()
CAT = TOK.encode("cat")[0]
DOG = TOK.encode("dog")[0]
COMMA = TOK.encode(",")[0]
INV = 1 / 1.1  # A1111 square_bracket_multiplier

# --------------------------------------------------------------------------------------------------
# parse_weights
# --------------------------------------------------------------------------------------------------

PARSE_CASES = [
    # A1111's own doctest examples (prompt_parser.py, parse_prompt_attention docstring)
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1),
    ]),
    # empty
    ("", [("", 1.0)]),
    # basic groups and nesting
    ("(a)", [("a", 1.1)]),
    ("((a))", [("a", 1.2100000000000002)]),
    ("[a]", [("a", 0.9090909090909091)]),
    ("[[a]]", [("a", 0.8264462809917354)]),
    ("(a (b) c)", [("a ", 1.1), ("b", 1.2100000000000002), (" c", 1.1)]),
    ("(a[b]c)", [("a", 1.1), ("b", 1.0), ("c", 1.1)]),
    ("[a](b)", [("a", INV), ("b", 1.1)]),
    # explicit weights
    ("(a:1.5)", [("a", 1.5)]),
    ("(a:0.5)", [("a", 0.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:+2)", [("a", 2.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:2.)", [("a", 2.0)]),
    ("a (b:0)", [("a ", 1.0), ("b", 0.0)]),
    ("((a:2))", [("a", 2.2)]),
    ("[(a:2)]", [("a", 1.8181818181818181)]),
    ("([a:1.5)]", [("a", 1.3636363636363635)]),  # ":1.5)" closes the round group across the "["
    ("(a:1) b", [("a b", 1.0)]),  # weight 1 merges with its neighbours
    ("(a:1.5)(b:1.5)", [("ab", 1.5)]),
    # not a weight: exponent, space, missing ")" -> ':' and number stay literal
    ("(a:1.2e1)", [("a:1.2e1", 1.1)]),
    ("(a: 1.5)", [("a: 1.5", 1.1)]),
    ("(a:1.5", [("a:1.5", 1.1)]),
    ("a:b", [("a:b", 1.0)]),
    ("[a:b:0.5]", [("a:b:0.5", INV)]),  # prompt editing is not supported: plain down-weighted text
    ("(a:1.5) [b:2]", [("a", 1.5), (" ", 1.0), ("b:2", INV)]),
    # unbalanced
    ("[a", [("a", INV)]),
    ("((a)", [("a", 1.2100000000000002)]),
    ("(a(b:2)", [("a", 1.1), ("b", 2.2)]),
    ("a) b", [("a) b", 1.0)]),
    ("a] b", [("a] b", 1.0)]),
    ("(a] b", [("a] b", 1.1)]),  # stray "]" inside an open "(" group
    ("a:1.5) b", [("a:1.5) b", 1.0)]),  # weight closer without an open "("
    # escapes
    ("\\\\", [("\\", 1.0)]),
    ("\\(a\\)", [("(a)", 1.0)]),
    ("\\[a\\]", [("[a]", 1.0)]),
    ("(\\(a\\))", [("(a)", 1.1)]),
    ("a\\b", [("ab", 1.0)]),  # a backslash escaping nothing is dropped
    ("a\\", [("a", 1.0)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), BREAK, (",b", 1.0)]),
    ("BREAK", [("", 1.0), BREAK, ("", 1.0)]),
    ("(a) BREAK [b]", [("a", 1.1), ("", 1.0), BREAK, ("", 1.0), ("b", INV)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
]


@pytest.mark.parametrize("prompt, expected", PARSE_CASES, ids=[repr(p) for p, _ in PARSE_CASES])
def test_parse_weights_matches_a1111(prompt, expected):
    got = parse_weights(prompt)
    assert got == expected  # exact floats: multiplied in A1111's order
    assert all(isinstance(t, str) and type(w) is float for t, w in got)


def test_parse_case_count():
    assert len(PARSE_CASES) >= 30


def test_break_inside_brackets_stays_a_marker():
    # Deliberate deviation: A1111 gives ('BREAK', -1.1) here and feeds the word "BREAK" to CLIP.
    assert parse_weights("x (a BREAK b)") == [("x ", 1.0), ("a", 1.1), BREAK, ("b", 1.1)]
    assert parse_weights("(a BREAK b:-1)") == [("a", -1.0), BREAK, ("b", -1.0)]  # never merged into text


@pytest.mark.parametrize("prompt", ["(a:.)", "(a:1.2.3)", "(a:..)"])
def test_parse_invalid_number_is_value_error(prompt):
    with pytest.raises(ValueError, match="invalid attention weight"):
        parse_weights(prompt)


@pytest.mark.parametrize("bad", [None, 3, b"a", ["a"]])
def test_parse_rejects_non_string(bad):
    with pytest.raises(ValueError, match="must be a str"):
        parse_weights(bad)


# --------------------------------------------------------------------------------------------------
# needs_weighting
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, expected", [
    ("a photo of a cat", False),
    ("", False),
    ("a:b, c", False),
    ("hello!", False),
    ("(a)", True),
    ("[a]", True),
    ("(a:1)", True),  # brackets must be removed before tokenizing
    ("\\(a\\)", True),
    ("a BREAK b", True),
    ("a ) b", False),  # a stray closer is literal and the text is unchanged: the plain path is exact
    ("a\\b", True),  # the lone backslash is dropped, as A1111 does
])
def test_needs_weighting(prompt, expected):
    assert needs_weighting(prompt) is expected


def test_needs_weighting_long_prompt():
    assert needs_weighting(" ".join(["cat"] * 75)) is False
    assert needs_weighting(" ".join(["cat"] * 76)) is True


def test_needs_weighting_rejects_non_string():
    with pytest.raises(ValueError, match="must be a str"):
        needs_weighting(None)


# --------------------------------------------------------------------------------------------------
# tokenize_weighted: chunking
# --------------------------------------------------------------------------------------------------


def words(n: int, w: str = "cat") -> str:
    return " ".join([w] * n)


def check_row(row, tokens, pad_id):
    k = len(tokens)
    assert row.shape == (CHUNK_LENGTH,)
    assert row[0].item() == BOS
    assert row[1 : k + 1].tolist() == tokens
    assert row[k + 1].item() == EOS
    assert (row[k + 2 :] == pad_id).all()


@pytest.mark.parametrize("pad_id", [EOS, 0])
def test_200_tokens_make_3_chunks(pad_id):
    ids, ws = tokenize_weighted(words(200), pad_id)
    assert ids.shape == ws.shape == (3, 77)
    assert ids.dtype == torch.long and ws.dtype == torch.float32
    check_row(ids[0], [CAT] * 75, pad_id)
    check_row(ids[1], [CAT] * 75, pad_id)
    check_row(ids[2], [CAT] * 50, pad_id)
    assert (ws == 1).all()
    assert ids[0, 76].item() == EOS and ids[1, 76].item() == EOS


@pytest.mark.parametrize("n, chunks", [(0, 1), (1, 1), (75, 1), (76, 2), (150, 2), (151, 3)])
def test_chunk_boundaries(n, chunks):
    ids, _ = tokenize_weighted(words(n), EOS)
    assert ids.shape[0] == chunks


@pytest.mark.parametrize("pad_id", [EOS, 0])
def test_plain_short_prompt_equals_plain_tokenization(pad_id):
    for prompt in ["a photo of a cat", "", "hello! world!!", words(75)]:
        ids, ws = tokenize_weighted(prompt, pad_id)
        assert torch.equal(ids, TOK([prompt], pad_id=pad_id))
        assert (ws == 1).all()


def test_break_forces_new_chunk():
    ids, ws = tokenize_weighted("cat BREAK dog", 0)
    assert ids.shape == (2, 77)
    check_row(ids[0], [CAT], 0)
    check_row(ids[1], [DOG], 0)
    assert (ws == 1).all()


def test_break_edge_cases():
    assert tokenize_weighted("cat BREAK", EOS)[0].shape[0] == 1  # nothing after BREAK: no extra chunk
    ids, _ = tokenize_weighted("BREAK cat", EOS)  # BREAK first: an empty chunk, as A1111
    assert ids.shape[0] == 2
    check_row(ids[0], [], EOS)
    check_row(ids[1], [CAT], EOS)
    assert tokenize_weighted("cat BREAK BREAK dog", EOS)[0].shape[0] == 3
    ids, _ = tokenize_weighted(words(10) + " BREAK " + words(100, "dog"), EOS)
    assert ids.shape[0] == 3
    check_row(ids[0], [CAT] * 10, EOS)
    check_row(ids[1], [DOG] * 75, EOS)
    check_row(ids[2], [DOG] * 25, EOS)


def test_comma_backtrack_moves_words_after_last_comma():
    assert COMMA_BACKTRACK == 20
    ids, ws = tokenize_weighted(words(70) + ", " + words(10, "dog"), EOS)
    assert ids.shape[0] == 2
    check_row(ids[0], [CAT] * 70 + [COMMA], EOS)  # 71 tokens, then padding
    check_row(ids[1], [DOG] * 10, EOS)


@pytest.mark.parametrize("before_comma, backtracks", [(55, True), (54, False), (50, False), (74, True)])
def test_comma_backtrack_window(before_comma, backtracks):
    # comma at index `before_comma`; it backtracks iff 75 - index <= 20
    ids, _ = tokenize_weighted(words(before_comma) + ", " + words(40, "dog"), EOS)
    first = ids[0, 1:76].tolist()
    if backtracks:
        k = before_comma + 1
        check_row(ids[0], [CAT] * before_comma + [COMMA], EOS)
        assert ids[1, 1 : 75 - k + 1].tolist() == [DOG] * (75 - k)
    else:
        assert first == [CAT] * before_comma + [COMMA] + [DOG] * (74 - before_comma)


def test_comma_backtrack_can_be_disabled():
    ids, _ = tokenize_weighted(words(70) + ", " + words(10, "dog"), EOS, comma_backtrack=0)
    check_row(ids[0], [CAT] * 70 + [COMMA] + [DOG] * 4, EOS)
    check_row(ids[1], [DOG] * 6, EOS)


def test_comma_as_76th_token_goes_to_next_chunk_without_backtrack():
    ids, _ = tokenize_weighted(words(75) + ", dog", EOS)
    check_row(ids[0], [CAT] * 75, EOS)
    check_row(ids[1], [COMMA, DOG], EOS)


def test_weights_follow_tokens():
    ids, ws = tokenize_weighted("a (cat:1.5) [dog]", EOS)
    assert ids[0, :5].tolist() == [BOS, TOK.encode("a")[0], CAT, DOG, EOS]
    assert ws[0, :5].tolist() == pytest.approx([1.0, 1.0, 1.5, INV, 1.0])
    assert (ws[0, 5:] == 1).all()


def test_weights_follow_backtracked_tokens():
    ids, ws = tokenize_weighted(words(70) + ", (dog:2) " + words(10), EOS)
    assert ids[1, 1].item() == DOG and ws[1, 1].item() == 2.0
    assert (ws[0] == 1).all()


def test_openclip_pad_cuts_exclamation_marks():
    ids0, _ = tokenize_weighted("(wow!!)", 0)
    idsL, _ = tokenize_weighted("(wow!!)", EOS)
    assert ids0[0, :5].tolist() == [BOS, TOK.encode("wow")[0], 0, 0, EOS]
    assert idsL[0, 1:3].tolist() == TOK.encode("wow!!")


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=None, pad_id=0), "must be a str"),
    (dict(prompt=5, pad_id=0), "must be a str"),
    (dict(prompt="a", pad_id=-1), "pad_id"),
    (dict(prompt="a", pad_id="0"), "pad_id"),
    (dict(prompt="a", pad_id=0, comma_backtrack=75), "comma_backtrack"),
    (dict(prompt="a", pad_id=0, comma_backtrack=-1), "comma_backtrack"),
])
def test_tokenize_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tokenize_weighted(**kwargs)


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def tiny_encoders(name: str, seed: int):
    torch.manual_seed(seed)
    parts = build_parts(preset(name), device="cpu").eval()
    # Freshly initialised LayerNorms (weight 1, bias 0) make every final-normed token mean exactly 0,
    # so the mean-restoring ratio would be 0/0; trained CLIPs have a non-zero bias. Randomise them.
    with torch.no_grad():
        for enc in parts.text_encoders:
            for m in enc.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.normal_(1.0, 0.2)
                    m.bias.normal_(0.3, 0.2)
    return parts.config, parts.text_encoders


@pytest.fixture(scope="module")
def sdxl():
    return tiny_encoders("tiny-sdxl", 0)


@pytest.fixture(scope="module")
def sd15():
    return tiny_encoders("tiny-sd15", 1)


def plain(config, encoders, prompt):
    return encode_text(config, encoders, [TOK([prompt], pad_id=s.pad_id) for s in config.text_encoders])


def hidden(config, encoders, k, ids):
    spec = config.text_encoders[k]
    return encoders[k](ids, layer=spec.layer, final_norm=spec.final_norm, pooled=spec.pooled)


@pytest.mark.parametrize("model", ["sdxl", "sd15"])
@pytest.mark.parametrize("prompt", ["a photo of a cat", "", "hello! world", "(a:1) b", words(75)])
def test_unit_weights_equal_plain_encoding_exactly(model, prompt, request):
    config, encoders = request.getfixturevalue(model)
    with torch.no_grad():
        ctx, pooled = encode_prompt_weighted(config, encoders, prompt)
        ref_ctx, ref_pooled = plain(config, encoders, prompt.replace("(a:1)", "a"))
    assert ctx.shape == (1, 77, config.unet.context_dim)
    assert torch.equal(ctx, ref_ctx)
    if ref_pooled is None:
        assert pooled is None
    else:
        assert torch.equal(pooled, ref_pooled)


@pytest.mark.parametrize("model", ["sdxl", "sd15"])
def test_weighting_math(model, request):
    config, encoders = request.getfixturevalue(model)
    with torch.no_grad():
        ctx, _ = encode_prompt_weighted(config, encoders, "a (cat:1.5) sitting")
        ids = [TOK(["a cat sitting"], pad_id=s.pad_id) for s in config.text_encoders]
        start = 0
        for k, spec in enumerate(config.text_encoders):
            z = hidden(config, encoders, k, ids[k]).hidden  # (1, 77, C_k)
            c = z.shape[-1]
            got = ctx[..., start : start + c]
            start += c
            w = torch.ones(77)
            w[2] = 1.5  # [BOS] a cat sitting [EOS]
            expect = z * w[None, :, None]
            expect = expect * (z.mean() / expect.mean())
            torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
            # the mean is preserved, and "cat" is scaled 1.5x relative to every other token
            torch.testing.assert_close(got.mean(), z.mean(), rtol=1e-5, atol=1e-7)
            s = (got[0, 1] / z[0, 1]).median()
            torch.testing.assert_close(got[0, 2], z[0, 2] * 1.5 * s, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got[0, 5:], z[0, 5:] * s, rtol=1e-4, atol=1e-6)
        assert start == ctx.shape[-1]


def test_long_prompt_chunks_concatenate_and_pooled_is_first_chunk(sdxl):
    config, encoders = sdxl
    prompt = " ".join(["a cat", "on a (red:1.2) mat"] * 30)  # 180 tokens, no commas
    with torch.no_grad():
        ctx, pooled = encode_prompt_weighted(config, encoders, prompt)
        n = tokenize_weighted(prompt, 0)[0].shape[0]
        assert n == tokenize_weighted(prompt, EOS)[0].shape[0] == 3
        assert ctx.shape == (1, 3 * 77, config.unet.context_dim)
        start = 0
        for k, spec in enumerate(config.text_encoders):
            ids, ws = tokenize_weighted(prompt, spec.pad_id)
            c = encoders[k].config.width
            for j in range(n):  # chunk j of the context is chunk j encoded alone, then weighted
                z = hidden(config, encoders, k, ids[j : j + 1]).hidden
                e = z * ws[j][None, :, None]
                e = e * (z.mean() / e.mean())
                torch.testing.assert_close(ctx[:, 77 * j : 77 * (j + 1), start : start + c], e, rtol=1e-5, atol=1e-6)
            start += c
        first = hidden(config, encoders, 1, tokenize_weighted(prompt, 0)[0][:1]).pooled
        later = hidden(config, encoders, 1, tokenize_weighted(prompt, 0)[0][1:2]).pooled
        assert pooled.shape == (1, encoders[1].config.projection_dim)
        torch.testing.assert_close(pooled, first, rtol=1e-5, atol=1e-6)  # batched vs single matmul
        assert not torch.allclose(pooled, later)
        # diffusers truncates to the first 75 tokens: its pooled vector is the same one
        _, ref_pooled = plain(config, encoders, prompt.replace("(red:1.2)", "red"))
        torch.testing.assert_close(pooled, ref_pooled, rtol=1e-6, atol=1e-6)


def test_sdxl_encoders_with_different_chunk_counts_are_padded(sdxl):
    config, encoders = sdxl
    prompt = words(70) + " wow" + "!" * 12  # OpenCLIP cuts every "!" out: 83 tokens vs fewer for CLIP-L
    assert tokenize_weighted(prompt, EOS)[0].shape[0] == 1
    assert tokenize_weighted(prompt, 0)[0].shape[0] == 2
    with torch.no_grad():
        ctx, _ = encode_prompt_weighted(config, encoders, prompt)
        empty = encode_empty_chunk(config, encoders)
    c0 = encoders[0].config.width
    assert ctx.shape == (1, 154, config.unet.context_dim)
    assert torch.equal(ctx[:, 77:, :c0], empty[..., :c0])  # CLIP-L padded with an empty chunk
    assert not torch.equal(ctx[:, 77:, c0:], empty[..., c0:])


def test_batch_is_padded_with_empty_prompt_chunks(sdxl):
    config, encoders = sdxl
    long = words(160)
    with torch.no_grad():
        ctx, pooled = encode_prompts_weighted(config, encoders, ["a (cat:1.3)", long, ""])
        one, one_pooled = encode_prompt_weighted(config, encoders, "a (cat:1.3)")
        lng, _ = encode_prompt_weighted(config, encoders, long)
        empty = encode_empty_chunk(config, encoders)
    assert ctx.shape == (3, 3 * 77, config.unet.context_dim) and pooled.shape[0] == 3
    torch.testing.assert_close(ctx[0:1, :77], one, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pooled[0:1], one_pooled, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ctx[1:2], lng, rtol=1e-6, atol=1e-6)
    for j in (1, 2):
        torch.testing.assert_close(ctx[0:1, 77 * j : 77 * (j + 1)], empty, rtol=1e-6, atol=1e-6)
    for j in range(3):
        torch.testing.assert_close(ctx[2:3, 77 * j : 77 * (j + 1)], empty, rtol=1e-6, atol=1e-6)


def test_pad_to_same_length(sd15):
    config, encoders = sd15
    with torch.no_grad():
        short, _ = encode_prompt_weighted(config, encoders, "a cat")
        long, _ = encode_prompt_weighted(config, encoders, words(160))
        empty = encode_empty_chunk(config, encoders)
    a, b = pad_to_same_length(short, long, empty)
    assert a.shape == b.shape == long.shape
    assert torch.equal(b, long) and torch.equal(a[:, :77], short)
    assert torch.equal(a[:, 77:154], empty[0:1]) and torch.equal(a[:, 154:], empty[0:1])
    b2, a2 = pad_to_same_length(long, short.expand(2, -1, -1), empty)  # broadcast over a batch
    assert a2.shape == (2, 231, short.shape[2]) and torch.equal(b2, long)
    same_a, same_b = pad_to_same_length(short, short, empty)
    assert same_a is short and same_b is short
    with pytest.raises(ValueError, match="77"):
        pad_to_same_length(short[:, :70], long, empty)
    with pytest.raises(ValueError, match="empty_chunk"):
        pad_to_same_length(short, long, empty[:, :10])
    with pytest.raises(ValueError, match="widths"):
        pad_to_same_length(short, long[..., :8], empty)


def test_encode_errors(sd15, sdxl):
    config, encoders = sd15
    with pytest.raises(ValueError, match="must be a str"):
        encode_prompt_weighted(config, encoders, None)
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a str"):
        encode_prompts_weighted(config, encoders, ["a", 3])
    with pytest.raises(ValueError, match="list of str"):
        encode_prompts_weighted(config, encoders, "a")
    with pytest.raises(ValueError, match="empty"):
        encode_prompts_weighted(config, encoders, [])
    with pytest.raises(ValueError, match="text encoders"):
        encode_prompt_weighted(sdxl[0], encoders, "a")
