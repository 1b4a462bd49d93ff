"""Answer words and attribution targets (method.md 1.4).

Words are built from the answer's token strings: a token that starts with whitespace, with the
SentencePiece marker '▁' or the byte-level BPE marker 'Ġ', or that is punctuation, starts a new
word; other tokens continue the previous word.  When no token after the first carries a
word-start marker the tokenizer is taken to be word-level and every token is a word.  Special tokens (EOS, padding, the mask token)
belong to no word.

"Nouns" are found by a *lexicon heuristic*: alphabetic words of two letters or more that are not
in a stoplist of English function words (articles, pronouns, prepositions, conjunctions,
auxiliaries, common verbs and adverbs) and do not end in "ly".  It needs no model and no
download, and it is wrong sometimes (it keeps adjectives, for one).  For real part-of-speech
tagging pass a callable, e.g. with spaCy::

    nlp = spacy.load("en_core_web_sm")
    def nouns(words, tokens):
        doc = nlp(" ".join(w.text for w in words))
        keep = {t.i for t in doc if t.pos_ in ("NOUN", "PROPN")}
        return [w.tokens for i, w in enumerate(words) if i in keep]
    ex.explain(image, prompt, targets=nouns)

(spaCy may split words differently; map by text when that matters.)

>>> ws = group_words(["A", " red", " bus", "es", " on", " the", " road", "."])
>>> [w.text for w in ws]
['A', 'red', 'buses', 'on', 'the', 'road', '.']
>>> [t.name for t in resolve_targets("nouns", ws, 8)]
['red', 'buses', 'road']
>>> [w.text for w in group_words(["a", "red", "bus"])]     # word-level tokenizer
['a', 'red', 'bus']
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Word", "Target", "group_words", "is_content_word", "resolve_targets", "STOPWORDS",
           "FUNCTION_WORDS", "is_function_word", "repeated_function_words",
           "interference_tokens", "MAX_PADDING_MAPS", "AGGREGATE"]

#: name of the aggregate target (the sum of all target scores), always the last map
AGGREGATE = "<aggregate>"

STOPWORDS = frozenset("""
a an the this that these those there here it its it's i me my mine we us our ours you your yours
he him his she her hers they them their theirs what which who whom whose where when why how
and or but nor so yet if then than because as while although though unless until since
of in on at by for with without within about above below over under into onto from to up down
out off through across along around behind beside besides between beyond near among against
toward towards upon during before after via per
is am are was were be been being do does did doing done have has had having
can could may might must shall should will would ought
not no yes all any both each either neither every few many more most much other some such
own same only very too also just quite rather almost again ever never always often sometimes
one two three four five six seven eight nine ten
seems seem appears appear looks look shows show showing shown see seen sees
image picture photo photograph shot scene view
left right top bottom front back side middle center centre background foreground
""".split())


#: Function words for SICD's M_rep (method.md 2.4): articles, determiners, pronouns,
#: prepositions, conjunctions and auxiliaries -- the first five lines of :data:`STOPWORDS`
#: without the content-like entries (numbers, "image", "left", ...).  Punctuation tokens count
#: as function words too (:func:`is_function_word`).
FUNCTION_WORDS = frozenset("""
a an the this that these those there here it its it's i me my mine we us our ours you your yours
he him his she her hers they them their theirs what which who whom whose where when why how
and or but nor so yet if then than because as while although though unless until since
of in on at by for with without within about above below over under into onto from to up down
out off through across along around behind beside besides between beyond near among against
toward towards upon during before after via per
is am are was were be been being do does did doing done have has had having
can could may might must shall should will would ought
""".split())


@dataclass(frozen=True)
class Word:
    """One answer word: its text and the indices of its tokens in the response."""

    text: str
    tokens: tuple

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Target:
    """One attribution target: a name and the response token indices whose scores it sums."""

    name: str
    tokens: tuple

    def to_dict(self) -> dict:
        return {"name": self.name, "tokens": list(self.tokens)}


def _is_punct(s: str) -> bool:
    return bool(s) and all(unicodedata.category(c).startswith("P") or
                           unicodedata.category(c).startswith("S") for c in s)


def _clean(tok: str) -> tuple[str, bool]:
    """(text without markers, starts_new_word)."""
    starts = False
    if tok[:1] in ("▁", "Ġ", "Ċ"):
        starts = True
        tok = tok[1:]
    if tok[:1].isspace():
        starts = True
    return tok.strip(), starts


def group_words(tokens: Sequence[str], special: Sequence[bool] | None = None) -> list:
    """Group token strings into :class:`Word` s (special tokens are skipped and break words)."""
    words: list = []
    cur_text, cur_idx = "", []
    prev_punct = True
    # a word-level tokenizer (no token after the first carries a word-start marker): every
    # token is a word of its own
    word_level = len(tokens) > 1 and not any(
        _clean(t)[1] for j, t in enumerate(tokens) if j and not (special and special[j]))

    def flush():
        nonlocal cur_text, cur_idx
        if cur_idx and cur_text:
            words.append(Word(cur_text, tuple(cur_idx)))
        cur_text, cur_idx = "", []

    for j, tok in enumerate(tokens):
        if special is not None and special[j]:
            flush()
            prev_punct = True
            continue
        text, starts = _clean(tok)
        if not text:            # pure whitespace: ends the word
            flush()
            prev_punct = True
            continue
        punct = _is_punct(text)
        if starts or punct or prev_punct or not cur_idx or word_level:
            flush()
        cur_text += text
        cur_idx.append(j)
        prev_punct = punct
    flush()
    return words


def _norm(s: str) -> str:
    return s.strip().strip(".,;:!?\"'()[]{}").lower()


def is_content_word(text: str) -> bool:
    """The "noun" heuristic: alphabetic, >= 2 letters, not a stopword, not an -ly adverb."""
    w = _norm(text)
    return (len(w) >= 2 and w.replace("-", "").isalpha() and w not in STOPWORDS
            and not w.endswith("ly"))


def is_function_word(text: str) -> bool:
    """True for a word of :data:`FUNCTION_WORDS` (case-insensitive) or a punctuation token.

    >>> is_function_word("The"), is_function_word(","), is_function_word("dog")
    (True, True, False)
    """
    t = text.strip()
    return (bool(t) and _is_punct(t)) or _norm(t) in FUNCTION_WORDS


def repeated_function_words(words: Sequence[Word]) -> list:
    """The answer's function words that occur more than once (every occurrence, in order):
    the words whose per-token maps form SICD's M_rep (method.md 2.4).

    >>> ws = [Word("a", (0,)), Word("dog", (1,)), Word("and", (2,)), Word("a", (3,)),
    ...       Word("cat", (4,))]
    >>> [(w.text, w.tokens) for w in repeated_function_words(ws)]
    [('a', (0,)), ('a', (3,))]
    """
    def key(w):
        t = w.text.strip()
        return t if _is_punct(t) else _norm(t)

    counts: dict = {}
    for w in words:
        if is_function_word(w.text):
            counts[key(w)] = counts.get(key(w), 0) + 1
    return [w for w in words if is_function_word(w.text) and counts[key(w)] > 1]


#: At most this many padding positions get an interference map (evenly spaced over the padding).
MAX_PADDING_MAPS = 8


def interference_tokens(words: Sequence[Word], token_ids: Sequence[int], is_special: Sequence[bool],
                        token_strings: Sequence[str] | None = None, mask_id: int | None = None,
                        max_padding: int = MAX_PADDING_MAPS) -> list:
    """The response tokens whose per-token maps make SICD's M_rep (method.md 2.4), as Targets:

    * every occurrence of the answer's repeated function words (:func:`repeated_function_words`);
    * the answer's **padding**: the special tokens (EOS / end-of-turn / padding, never the mask
      token) that fill the response after the answer, when there are two or more of them -- the
      token a diffusion model repeats most (the released code counts it among the repeated
      tokens too).  At most ``max_padding`` of them, evenly spaced, since their maps are much
      alike (mean pairwise correlation 0.68 on the bundled model) and each costs a backward
      vector.

    >>> ws = [Word("a", (0,)), Word("dog", (1,)), Word("and", (2,)), Word("a", (3,)),
    ...       Word("cat", (4,))]
    >>> ids = [5, 6, 7, 5, 8, 2, 2, 2]
    >>> special = [False] * 5 + [True] * 3
    >>> [(t.name, t.tokens) for t in interference_tokens(ws, ids, special, max_padding=2)]
    [('a', (0,)), ('a', (3,)), ('#5', (5,)), ('#7', (7,))]
    """
    if max_padding < 0:
        raise ValueError(f"max_padding must be >= 0, got {max_padding}")
    out = [Target(w.text, tuple(w.tokens)) for w in repeated_function_words(words)]
    pad = [j for j, (t, sp) in enumerate(zip(token_ids, is_special))
           if sp and (mask_id is None or int(t) != int(mask_id))]
    if len(pad) >= 2 and max_padding > 0:
        m = min(len(pad), int(max_padding))
        pick = sorted({int(round(x)) for x in
                       (k * (len(pad) - 1) / max(m - 1, 1) for k in range(m))})
        for q in pick:
            j = pad[q]
            name = (token_strings[j].strip() if token_strings is not None else "") or f"#{j}"
            out.append(Target(name, (j,)))
    return out


def _group_by_text(words) -> list:
    """One Target per distinct word text (case-insensitive), all its occurrences together."""
    out: dict = {}
    for w in words:
        key = _norm(w.text)
        name, toks = out.get(key, (w.text, ()))
        out[key] = (name, toks + tuple(w.tokens))
    return [Target(name, toks) for name, toks in out.values()]


def resolve_targets(spec, words: Sequence[Word], n_tokens: int, token_strings=None,
                    valid=None) -> list:
    """Resolve a targets specification to a list of :class:`Target` s.

    spec      "nouns" (content words, heuristic above; one target per distinct word),
              "all" (one target per non-special answer token), a list of words (str; a
              multi-word str is a phrase: the tokens of every occurrence of those consecutive
              words make one target), a list of response token indices (int), or a callable
              ``(words, tokens) -> indices`` that returns token indices (one target each),
              lists of them (one target per list) or :class:`Target` s (a name and its
              token indices).
    words     the answer's words (:func:`group_words`)
    n_tokens  response length
    valid     optional bool per token (False for special tokens), used by "all"
    """
    token_strings = list(token_strings) if token_strings is not None else [str(i) for i in
                                                                          range(n_tokens)]
    valid = list(valid) if valid is not None else [True] * n_tokens
    if isinstance(spec, str):
        if spec == "nouns":
            return _group_by_text([w for w in words if is_content_word(w.text)])
        if spec == "all":
            return [Target(token_strings[j].strip() or f"#{j}", (j,))
                    for j in range(n_tokens) if valid[j]]
        spec = [spec]           # a single word
    if callable(spec):
        got = spec(list(words), list(token_strings))
        return _from_indices(list(got), n_tokens, token_strings)
    spec = list(spec)
    if not spec:
        raise ValueError("targets is empty")
    if all(isinstance(s, str) for s in spec):
        by_text: dict = {}
        for w in words:
            by_text.setdefault(_norm(w.text), []).append(w)
        out = []
        for s in spec:
            ws = by_text.get(_norm(s))
            if not ws and len(s.split()) > 1:
                ws = _phrase_words(s, words)
            if not ws:
                raise ValueError(f"target {'phrase' if len(s.split()) > 1 else 'word'} {s!r} "
                                 f"is not in the answer; the answer's words are "
                                 f"{[w.text for w in words]}")
            out.append(Target(s, tuple(sorted({j for w in ws for j in w.tokens}))))
        return out
    return _from_indices(spec, n_tokens, token_strings)


def _phrase_words(phrase: str, words: Sequence[Word]) -> list:
    """The words of every occurrence of a multi-word ``phrase`` in the answer: consecutive
    words equal to the phrase's words (case-insensitive, surrounding punctuation ignored;
    punctuation-only words are skipped on both sides and left out), e.g. "a red circle" in "a red circle ,
    a blue star".

    >>> ws = [Word(t, (i,)) for i, t in enumerate("a red circle , a red star".split())]
    >>> [w.text for w in _phrase_words("A red, circle", ws)]
    ['a', 'red', 'circle']
    >>> [w.tokens[0] for w in _phrase_words("a red", ws)]
    [0, 1, 4, 5]
    """
    parts = [p for p in (_norm(x) for x in phrase.split()) if p]
    seq = [w for w in words if _norm(w.text)]
    keys = [_norm(w.text) for w in seq]
    out: list = []
    n = len(parts)
    for i in range(len(seq) - n + 1) if n else ():
        if keys[i:i + n] == parts:
            out.extend(seq[i:i + n])
    return out


def _from_indices(spec, n_tokens, token_strings) -> list:
    out = []
    for s in spec:
        named = isinstance(s, Target)
        idx = tuple(int(i) for i in s.tokens) if named else (
            (int(s),) if _is_int(s) else tuple(int(i) for i in s))
        if not idx:
            raise ValueError("a target has no token indices")
        for i in idx:
            if not -n_tokens <= i < n_tokens:
                raise ValueError(f"target token index {i} is out of range: the answer has "
                                 f"{n_tokens} tokens")
        idx = tuple(i % n_tokens for i in idx)
        name = s.name if named else ("".join(token_strings[i] for i in idx).strip()
                                     or f"#{idx[0]}")
        out.append(Target(name, idx))
    return out


def _is_int(x) -> bool:
    try:
        import numbers
        return isinstance(x, numbers.Integral) or (hasattr(x, "ndim") and x.ndim == 0)
    except Exception:       # pragma: no cover
        return False
