"""Parity of ``stablexl.models.tokenizer`` with transformers' ``CLIPTokenizer``.

The reference is built offline from the same packaged vocabulary: vocab.json
and merges.txt are derived from ``bpe_simple_vocab_16e6.txt.gz`` and loaded
with ``CLIPTokenizer.from_pretrained(dir)`` -- the path diffusers takes -- once
with the CLIP-L pad token ("<|endoftext|>") and once with OpenCLIP's ("!").

Note: in transformers 5.x ``CLIPTokenizer(vocab_file=..., merges_file=...)``
silently ignores both files (the slow-tokenizer keywords are gone) and yields a
3-token vocabulary, hence ``from_pretrained``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import time
import unicodedata

import pytest
import regex
import torch

from stablexl.models.tokenizer import CLIPTokenizer, default_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ASSET_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
N_PROMPTS = 2400
MAX_LEN = 77
PAD_TOKENS = {"<|endoftext|>": 49407, "!": 0}


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------
def _asset_path():
    import importlib.resources

    return importlib.resources.files("stablexl").joinpath("assets").joinpath(
        "bpe_simple_vocab_16e6.txt.gz"
    )


def _reference_files(directory) -> None:
    """Write vocab.json / merges.txt derived independently from the gz file."""
    lines = gzip.decompress(_asset_path().read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    # GPT-2 byte table, in the order its dict yields values.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_chars = [chr(b) for b in printable]
    byte_chars += [chr(256 + n) for n in range(256 - len(printable))]
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    (directory / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """{pad_token: transformers.CLIPTokenizer} built without network access."""
    refs = {}
    for pad_token in PAD_TOKENS:
        d = tmp_path_factory.mktemp("clip_tokenizer")
        _reference_files(d)
        (d / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "CLIPTokenizer",
                    "model_max_length": MAX_LEN,
                    "bos_token": "<|startoftext|>",
                    "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>",
                    "pad_token": pad_token,
                }
            ),
            encoding="utf-8",
        )
        ref = transformers.CLIPTokenizer.from_pretrained(str(d))
        assert len(ref) == 49408
        assert ref.pad_token_id == PAD_TOKENS[pad_token]
        refs[pad_token] = ref
    return refs


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


# --------------------------------------------------------------------------
# deterministic prompt corpus
# --------------------------------------------------------------------------
SUBJECTS = [
    "a photo of a cat", "portrait of an old man", "a castle on a hill", "cyberpunk city",
    "a bowl of ramen", "astronaut riding a horse", "the Eiffel Tower at night",
    "a red sports car", "mountain lake at sunrise", "a cute corgi puppy", "an oil painting",
    "steampunk airship", "a dragon made of glass", "medieval knight", "a cozy cabin",
    "underwater coral reef", "a robot playing chess", "Mona Lisa", "Van Gogh's Starry Night",
    "a bustling Tokyo street", "ancient Greek temple", "a teddy bear", "neon sign",
]
MODIFIERS = [
    "highly detailed", "8k", "4K UHD", "trending on artstation", "octane render",
    "masterpiece", "best quality", "(masterpiece:1.2)", "[[blurry]]", "{cinematic}",
    "by Greg Rutkowski", "unreal engine 5", "f/1.8", "35mm", "hdr", "bokeh",
    "studio lighting", "--ar 16:9", "#art", "@artist", "photorealistic", "dramatic",
    "volumetric lighting", "sharp focus", "low-poly", "ultra-wide", "1920x1080",
]
PUNCT = list("!!!???...,,;;::--__**##@@$$%%^^&&||\\//()[]{}<>~~`'\"+=") + [
    "!!!", "?!", "...", "…", "—", "–", "«", "»", "“", "”", "‘", "’", "•", "©", "®", "™",
    "°", "±", "×", "÷", "§", "¶", "†", "‡", "€", "£", "¥", "¢", "¤", "½", "¼", "²", "³",
    "ⓐ", "①", "Ⅻ", "∞", "≈", "≠", "√", "∑", "→", "⇒", "★", "☆", "♥", "♪", "■", "◆",
]
NUMBERS = [
    "0", "7", "42", "1234567890", "3.14159", "1,000,000", "2023", "1e-5", "0x1F",
    "50%", "$9.99", "12:30", "1/2", "٣٤٥", "१२३", "๑๒๓", "²³", "⅓", "Ⅳ", "１２３",
]
CONTRACTIONS = [
    "it's", "we're", "I've", "I'm", "you'll", "he'd", "don't", "can't", "won't",
    "IT'S", "WE'RE", "I'VE", "YOU'LL", "HE'D", "'s", "'t", "'re", "'ve", "'m", "'ll",
    "'d", "''s", "'sss", "rock'n'roll", "it’s", "o'clock", "'ſ", "'Ś", "cat's pajamas",
    "'S", "'RE", "'ll've",
]
UNICODE_WORDS = [
    "café", "naïve", "Ångström", "crème brûlée", "piñata", "Straße", "STRASSE", "ẞ",
    "Ärger", "Øresund", "Łódź", "Dvořák", "İstanbul", "ıi", "ΟΔΟΣ", "Σίσυφος",
    "ΣΊΣΥΦΟΣ ΣΑΣ", "αβγδ", "Москва", "ПРИВЕТ мир", "Ёж", "日本語", "東京タワー",
    "中文字符", "한국어", "ひらがな", "カタカナ", "العربية", "مرحبا بالعالم", "עברית",
    "हिन्दी", "தமிழ்", "ภาษาไทย", "ქართული", "Հայերեն", "ﬁne ﬂour", "ＡＢＣ ｄｅｆ",
    "ℌ𝔢𝔩𝔩𝔬", "𝐁𝐨𝐥𝐝", "Ⓐⓑⓒ", "ǅ ǈ ǋ", "ŉ", "ǰ", "ﬀ", "K Å Ω", "ſ", "µ",
    "Ꭰ ꭰ", "Ⴀ ⴀ", "Ᲊ", "ꟋꟌꟚꟜ", "\U00010d50\U00010d51", "\U00016ea0",
    "\U00010940\U00010941", "\u0558", "ᄀ\u1161\u11a8", "\u1100\u1161", "한\u11a8",
]
COMBINING = [
    "e\u0301", "a\u0308", "o\u0302\u0323", "o\u0323\u0302", "q\u0307\u0323",
    "s\u0323\u0307", "A\u030a", "n\u0303", "u\u0308\u0304", "a\u0301\u0334",
    "a\u0334\u0301", "x\u0301\u0301", "Z\u0336\u0337\u0338", "i\u0307", "\u0301",
    "\u0301abc", "ǖ\u0316", "ḉ", "Z̴̡̧̛̖͈̙͎̘̖͍͎͖̲̩̱̜͓̰̙̼̤̬͉̳̞̎̎͂̈́̈́̌͊͆͛̆̉̑̐̚͝ͅa̶l̸g̷o̴",
    "\u05d0\u05b7\u05bc", "\u0915\u093c\u094d", "\u0e01\u0e38\u0e48", "\u0898\u0334",
    "a\u1abf\u0334", "e\u1df6\u0301", "\U00011935\U00011930", "\U0001e4ec\u0334",
    "\u0301\u0334", "\u0f71\u0f72\u0f74",
]
EMOJI = [
    "😀", "🐱", "🔥🔥🔥", "❤️", "❤", "👍🏽", "👋🏻👋🏼👋🏽👋🏾👋🏿", "👨‍👩‍👧‍👦", "👩🏽‍💻",
    "🏳️‍🌈", "🏴‍☠️", "🇯🇵", "🇺🇸🇬🇧", "1️⃣", "#️⃣", "©️", "☺︎", "🧑‍🚀", "🫠", "🦄✨",
    "(╯°□°)╯︵ ┻━┻", "¯\\_(ツ)_/¯", ":-)", "<3", "🙂\u200d", "\u200d", "\ufe0f",
]
WHITESPACE = [
    " ", "  ", "\t", "\n", "\r\n", "\t\t \n", "\u00a0", "\u3000", "\u2003", "\u202f",
    "\u205f", "\u1680", "\u2028", "\u2029", "\x0b", "\x0c", "\x85", "\u200b", "\ufeff",
    "\x1c", "\x1d", "\x1e", "\x1f", "\u180e", "\u200c", "\u2060",
]
SPECIAL = [
    "<|endoftext|>", "<|startoftext|>", "<|EndOfText|>", "<|ENDOFTEXT|>", "<|startOfText|>",
    "<|endoftext", "endoftext|>", "< |endoftext| >", "<|endoftext|><|endoftext|>",
    "!<|endoftext|>!", "x<|endoftext|>y", "<<|endoftext|>>", "<|<|startoftext|>|>",
    "||endoftext||", "<|end of text|>", "!!<|EndOfText|>!!",
]
HTML = [
    "&amp;", "&lt;b&gt;bold&lt;/b&gt;", "&quot;quoted&quot;", "&#39;", "&#x27;", "&nbsp;",
    "Tom &amp; Jerry", "&amp;amp;", "<b>bold</b>", "a &gt; b", "&copy; 2024",
]
ODD = [
    "cafÃ©", "donâ€™t", "\x00", "\x07", "\x7f", "\x80", "\x9f", "\ue000", "\U000f0000",
    "\U0010ffff", "\ufffd", "\ufffe", "\U0001ffff", "\U000e0001", "\U000e0041",
    "\U0003fc3f", "http://example.com/a?b=c&d=e", "user@example.com", "C:\\path\\to",
    "a_b-c.d", "snake_case_name", "CamelCaseWord", "ALLCAPS", "x" * 40, "ab" * 30,
    "loooooooooooooooooooooooooooooooooooooooong", "!" * 20, "." * 50, "1" * 90,
]
CATEGORIES = [
    SUBJECTS, MODIFIERS, PUNCT, NUMBERS, CONTRACTIONS, UNICODE_WORDS, COMBINING, EMOJI,
    SPECIAL, HTML, ODD,
]


def _random_char(rng: random.Random) -> str:
    """A code point from anywhere (weighted towards the populated planes)."""
    while True:
        plane = rng.choice([0, 0, 0, 0, 1, 1, 2, 3, 14, 15])
        cp = plane * 0x10000 + rng.randrange(0x10000)
        if not 0xD800 <= cp <= 0xDFFF:
            return chr(cp)


def _case(rng: random.Random, s: str) -> str:
    mode = rng.randrange(5)
    if mode == 0:
        return s.upper()
    if mode == 1:
        return s.title()
    if mode == 2:
        return "".join(c.upper() if rng.random() < 0.5 else c for c in s)
    return s


def _prompt(rng: random.Random, i: int) -> str:
    kind = i % 12
    if kind == 0:  # ordinary SD prompt
        parts = [rng.choice(SUBJECTS)] + rng.sample(MODIFIERS, rng.randrange(0, 6))
        return ", ".join(parts)
    if kind == 1:  # very long (> 77 tokens)
        parts = [rng.choice(SUBJECTS)] + [rng.choice(MODIFIERS) for _ in range(rng.randrange(15, 60))]
        return ", ".join(parts)
    if kind == 2:  # punctuation and numbers
        return " ".join(rng.choice(PUNCT + NUMBERS) for _ in range(rng.randrange(1, 12)))
    if kind == 3:  # contractions, upper case
        return " ".join(_case(rng, rng.choice(CONTRACTIONS + SUBJECTS)) for _ in range(rng.randrange(1, 6)))
    if kind == 4:  # unicode letters and combining marks, odd casing
        return " ".join(_case(rng, rng.choice(UNICODE_WORDS + COMBINING)) for _ in range(rng.randrange(1, 6)))
    if kind == 5:  # emoji
        return "".join(rng.choice([rng.choice(EMOJI), rng.choice(SUBJECTS), " "]) for _ in range(rng.randrange(1, 8)))
    if kind == 6:  # odd whitespace everywhere, incl. leading / trailing
        ws = lambda: "".join(rng.choice(WHITESPACE) for _ in range(rng.randrange(0, 4)))  # noqa: E731
        words = [rng.choice(SUBJECTS + UNICODE_WORDS + PUNCT) for _ in range(rng.randrange(0, 5))]
        return ws() + ws().join(words) + ws()
    if kind == 7:  # special-token literals inside text
        pieces = [rng.choice(SPECIAL), rng.choice(SUBJECTS), rng.choice(PUNCT), rng.choice(SPECIAL)]
        rng.shuffle(pieces)
        return rng.choice(["", " "]).join(pieces[: rng.randrange(1, 5)])
    if kind == 8:  # HTML entities / markup and mojibake
        return " ".join(rng.choice(HTML + ODD + SUBJECTS) for _ in range(rng.randrange(1, 5)))
    if kind == 9:  # random code points, glued to letters / digits / punctuation
        return "".join(rng.choice(["a", "1", "!", " ", "'", "", _random_char(rng)]) + _random_char(rng)
                       for _ in range(rng.randrange(1, 10)))
    if kind == 10:  # anything mixed, no separators
        return "".join(rng.choice(rng.choice(CATEGORIES + [WHITESPACE])) for _ in range(rng.randrange(1, 10)))
    # kind == 11: fragments from every category with random separators
    seps = [" ", ", ", "", "\n", " | ", "!", "'"]
    return rng.choice(seps).join(
        _case(rng, rng.choice(rng.choice(CATEGORIES))) for _ in range(rng.randrange(1, 12))
    )


def corpus() -> list[str]:
    rng = random.Random(20240229)
    fixed = [
        "", " ", "\t\n ", "!", "!!!", "<|endoftext|>", "a photo of a cat",
        "A PHOTO OF A CAT", "  a   photo\tof\na cat  ", "&amp;", "ΟΔΟΣ",
    ]
    prompts = fixed + [_prompt(rng, i) for i in range(N_PROMPTS - len(fixed))]
    return prompts


PROMPTS = corpus()


def _reference_ids(ref, texts, max_length=MAX_LEN):
    out = ref(texts, padding="max_length", max_length=max_length, truncation=True)
    return out["input_ids"]


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------
def test_asset_checksum():
    assert hashlib.sha256(_asset_path().read_bytes()).hexdigest() == ASSET_SHA256


def test_vocab_matches_reference(tok, references):
    ref = references["<|endoftext|>"]
    assert tok.vocab_size == 49408
    assert (tok.BOS, tok.EOS, tok.MAX_LENGTH) == (49406, 49407, 77)
    vocab = ref.get_vocab()
    assert len(vocab) == 49408
    assert all(vocab[t] == i for i, t in enumerate(tok._id_to_token))


def test_default_tokenizer_is_shared_and_explicit_path_agrees(tmp_path):
    assert default_tokenizer() is default_tokenizer()
    plain = tmp_path / "bpe.txt"
    plain.write_bytes(gzip.decompress(_asset_path().read_bytes()))
    explicit = CLIPTokenizer(str(_asset_path()))
    from_plain = CLIPTokenizer(plain)
    text = "An astronaut riding a horse, 8k!!"
    expected = default_tokenizer().encode(text)
    assert explicit.encode(text) == expected
    assert from_plain.encode(text) == expected


def test_corpus_is_varied():
    assert len(PROMPTS) >= 2000
    joined = "".join(PROMPTS)
    assert "" in PROMPTS
    assert "<|endoftext|>" in joined and "&amp;" in joined and "\u200d" in joined
    assert any(len(default_tokenizer().encode(p)) > 75 for p in PROMPTS)
    assert regex.search(r"\p{Han}", joined) and regex.search(r"\p{Arabic}", joined)
    assert regex.search(r"\p{Mn}", joined) and "\U0001f3fd" in joined  # marks, skin tone


@pytest.mark.parametrize("pad_token", list(PAD_TOKENS))
def test_parity_with_transformers(tok, references, pad_token):
    pad_id = PAD_TOKENS[pad_token]
    expected = torch.tensor(_reference_ids(references[pad_token], PROMPTS), dtype=torch.long)
    t0 = time.perf_counter()
    got = tok(PROMPTS, pad_id=pad_id)
    elapsed = time.perf_counter() - t0
    assert got.shape == (len(PROMPTS), MAX_LEN) and got.dtype == torch.long
    bad = [i for i in range(len(PROMPTS)) if not torch.equal(got[i], expected[i])]
    assert not bad, (
        f"{len(bad)} / {len(PROMPTS)} prompts differ (pad {pad_token!r}); first: "
        f"{PROMPTS[bad[0]]!r}\n ours {got[bad[0]].tolist()}\n ref  {expected[bad[0]].tolist()}"
    )
    print(f"\n[tokenizer parity] pad={pad_token!r}: {len(PROMPTS)} prompts identical, "
          f"ours {elapsed:.3f}s")


@pytest.mark.parametrize("pad_token", list(PAD_TOKENS))
def test_encode_untruncated_parity(tok, references, pad_token):
    """encode(..., pad_id=...) == the reference's full, untruncated id stream."""
    ref = references[pad_token]
    for text in PROMPTS[::7]:
        expected = ref(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text, pad_id=PAD_TOKENS[pad_token]) == expected, text
    # without pad_id, only <|startoftext|> / <|endoftext|> are literals
    assert tok.encode("wow!!!") == references["<|endoftext|>"]("wow!!!", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("max_length", [2, 3, 10, 76, 78, 128])
def test_other_max_lengths(tok, references, max_length):
    texts = PROMPTS[:200]
    for pad_token, pad_id in PAD_TOKENS.items():
        expected = _reference_ids(references[pad_token], texts, max_length)
        assert tok(texts, pad_id=pad_id, max_length=max_length).tolist() == expected


def test_every_code_point_sample(tok, references):
    """Sweep the code space: every character assigned in Unicode 17 outside the
    big uniform blocks (Han, Tangut, Hangul syllables, private use), every one
    with a canonical decomposition, and every 61st other code point -- each
    glued to a letter, a digit, "!" and followed by reorderable marks."""
    # A private copy of the Rust pipeline: transformers leaves padding /
    # truncation switched on in its backend after a padded call.
    ref = tokenizers.Tokenizer.from_str(references["<|endoftext|>"].backend_tokenizer.to_str())
    ref.no_padding()
    ref.no_truncation()
    uniform = regex.compile(r"[\p{Cn}\p{Co}\p{Script=Han}\p{Script=Tangut}\uac00-\ud7a3]")
    canonical = regex.compile(r"\p{dt=canonical}")
    cps = [
        c for c in range(0x110000)
        if not 0xD800 <= c <= 0xDFFF
        and (c % 61 == 0 or not uniform.match(chr(c)) or canonical.match(chr(c)))
    ]
    assert len(cps) > 60_000
    bad = []
    step = 2000
    for k in range(0, len(cps), step):
        chunk = cps[k : k + step]
        text = " ".join(f"a{chr(c)}!{chr(c)}\u0334\u0301 1{chr(c)}" for c in chunk)
        if ref.encode(text, add_special_tokens=False).ids != tok.encode(text):
            for c in chunk:
                t = f"a{chr(c)}!{chr(c)}\u0334\u0301 1{chr(c)}"
                if ref.encode(t, add_special_tokens=False).ids != tok.encode(t):
                    bad.append(f"U+{c:04X}")
    assert not bad, f"{len(bad)} code points differ: {bad[:50]}"
    print(f"\n[tokenizer sweep] {len(cps)} code points identical")


def test_known_ids(tok, references):
    ids = tok("a photo of a cat", pad_id=tok.EOS)
    assert ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()
    assert ids[0].tolist() == _reference_ids(references["<|endoftext|>"], ["a photo of a cat"])[0]
    ids0 = tok("a photo of a cat", pad_id=0)
    assert ids0[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids0[0, 7:] == 0).all()
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    # OpenCLIP's pad token "!" is an added special token in transformers, so
    # with pad_id=0 every "!" is cut out as a standalone id 0.
    assert tok.encode("wow!!!") == [2781, 995]
    assert tok.encode("wow!!!", pad_id=0) == [2781, 0, 0, 0]
    assert tok.encode("x<|endoftext|>y") == [343, 49407, 344]


def test_truncation_keeps_eos(tok):
    long = ", ".join(["highly detailed masterpiece"] * 60)
    assert len(tok.encode(long)) > 200
    for pad_id in (0, tok.EOS):
        row = tok(long, pad_id=pad_id)[0]
        assert row[0] == tok.BOS and row[-1] == tok.EOS
        assert row[1:-1].tolist() == tok.encode(long)[:75]
    assert tok(["", "x"], pad_id=0).tolist()[0] == [tok.BOS, tok.EOS] + [0] * 75


def test_decode_round_trip_ascii(tok):
    rng = random.Random(7)
    words = ["a", "photo", "of", "cat", "astronaut", "riding", "horse", "on", "mars",
             "highly", "detailed", "painting", "the", "quick", "brown", "fox", "xylophone",
             "zzz", "qwerty", "supercalifragilistic"]
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(1, 15)))
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok("a photo of a cat", pad_id=tok.EOS)[0], skip_special_tokens=True) == "a photo of a cat"


def test_decode_parity(tok, references):
    ref = references["<|endoftext|>"]
    for text in PROMPTS[::3]:
        ids = tok.encode(text)
        assert tok.decode(ids) == ref.decode(ids), text
    # byte fragments that are not valid UTF-8 on their own
    rng = random.Random(3)
    for _ in range(300):
        ids = [rng.randrange(49408) for _ in range(rng.randrange(1, 8))]
        assert tok.decode(ids) == ref.decode(ids), ids


def test_bpe_is_cached_and_fast():
    fresh = CLIPTokenizer()
    t0 = time.perf_counter()
    fresh(PROMPTS, pad_id=fresh.EOS)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    fresh(PROMPTS, pad_id=fresh.EOS)
    warm = time.perf_counter() - t0
    assert len(fresh._bpe_cache) > 1000
    print(f"\n[tokenizer speed] {len(PROMPTS)} prompts: cold {cold:.3f}s, warm {warm:.3f}s")
    assert cold < 5.0 and warm < 3.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda t: t(None, pad_id=0), "must be a str"),
        (lambda t: t(123, pad_id=0), "must be a str"),
        (lambda t: t(b"bytes", pad_id=0), "must be a str"),
        (lambda t: t(["ok", None], pad_id=0), r"texts\[1\] must be a str"),
        (lambda t: t("x", pad_id=0, max_length=1), "max_length must be an int >= 2"),
        (lambda t: t("x", pad_id=0, max_length=0), "max_length must be an int >= 2"),
        (lambda t: t("x", pad_id=0, max_length=77.0), "max_length must be an int >= 2"),
        (lambda t: t("x", pad_id=-1), "pad_id=-1 is outside the vocabulary"),
        (lambda t: t("x", pad_id=49408), "pad_id=49408 is outside the vocabulary"),
        (lambda t: t("x", pad_id="!"), "pad_id must be an int"),
        (lambda t: t("x", pad_id=None), "pad_id must be an int"),
        (lambda t: t("a\ud800b", pad_id=0), "not valid Unicode"),
        (lambda t: t.encode(None), "text must be a str"),
        (lambda t: t.encode("x", pad_id=10**6), "outside the vocabulary"),
        (lambda t: t.decode([1, 49408]), "outside the vocabulary"),
        (lambda t: t.decode([[1, 2]]), "must be an int"),
    ],
)
def test_errors(tok, call, match):
    with pytest.raises(ValueError, match=match):
        call(tok)


def test_bad_vocab_file(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("#version: 0.2\ni n\nt h\n", encoding="utf-8")
    with pytest.raises(ValueError, match="merges"):
        CLIPTokenizer(short)


def test_normalisation_facts(tok):
    """Behaviours worth pinning (all confirmed by the parity tests above)."""
    # final capital sigma is lower-cased to σ, not ς (char-wise lowering)
    assert tok.decode(tok.encode("ΟΔΟΣ")) == "οδοσ"
    # no html.unescape / ftfy
    assert tok.decode(tok.encode("&amp;")) == "& amp ;"
    # NFC is applied
    assert tok.encode("cafe\u0301") == tok.encode("café")
    assert unicodedata.normalize("NFC", "cafe\u0301") == "café"
    # U+001C..U+001F are not whitespace for the reference
    assert tok.encode("a\x1cb") != tok.encode("a b")


# --------------------------------------------------------------------------
# the ASCII fast path (stdlib `re`) against the Unicode patterns (`regex`)
# --------------------------------------------------------------------------
def _ascii_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(128)]
    pieces = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "<|startoftext|>", "<|endoftext|>", "<|EndOfText|>",
              "  ", "\t", "\r\n", "\x0b\x0c", "\x1c\x1d\x1e\x1f", "123", "a1b2", "(word:1.2)", "!!!", "BREAK"]
    return ["".join(rng.choice(pieces) if rng.random() < 0.3 else rng.choice(alphabet)
                    for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_ascii_fast_path_splits_exactly_as_the_unicode_patterns():
    from stablexl.models import tokenizer as T

    u = T._unicode_patterns()
    for text in _ascii_texts(3000):
        slow = T._lower(u.ws_run.sub(" ", T._nfc(text)))
        assert T._normalize(text) == slow, repr(text)
        assert T._pre_split(slow) == u.pre_split.findall(slow), repr(text)


def test_ascii_prompts_do_not_import_regex():
    import subprocess
    import sys

    code = ("import sys; from stablexl.models.tokenizer import default_tokenizer; "
            "ids = default_tokenizer()(['a (red:1.2) apple, 3 cats!\\tBREAK <|endoftext|>'], pad_id=0); "
            "print('regex' in sys.modules, int(ids[0, 1]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"
    code_u = code.replace("apple", "\\u00e9clair")
    out_u = subprocess.run([sys.executable, "-c", code_u], capture_output=True, text=True, check=True).stdout.split()
    assert out_u[0] == "True"  # non-ASCII text takes the Unicode patterns
