import pytest

from diffcam.attribution.targets import (Target, group_words, is_content_word, resolve_targets)


def test_words_from_subwords():
    sp = ["▁A", "▁red", "▁bus", "es", "▁on", "▁the", "▁road", "."]
    assert [w.text for w in group_words(sp)] == ["A", "red", "buses", "on", "the", "road", "."]
    bpe = ["A", "Ġcat", "Ġsit", "s", ",", "Ġhappily"]
    ws = group_words(bpe)
    assert [w.text for w in ws] == ["A", "cat", "sits", ",", "happily"]
    assert ws[2].tokens == (2, 3)
    special = [False, False, True, False]
    assert [w.text for w in group_words([" a", " dog", "<eos>", " x"], special)] == ["a", "dog", "x"]


def test_nouns_heuristic_and_specs():
    ws = group_words([" A", " dog", " and", " a", " dog", " on", " grass", " quickly"])
    assert not is_content_word("the") and not is_content_word("quickly")
    t = resolve_targets("nouns", ws, 8)
    assert t == [Target("dog", (1, 4)), Target("grass", (6,))]
    assert [x.tokens for x in resolve_targets("all", ws, 8)] == [(j,) for j in range(8)]
    assert resolve_targets(["Grass"], ws, 8) == [Target("Grass", (6,))]
    assert [x.tokens for x in resolve_targets([2, [4, 6]], ws, 8)] == [(2,), (4, 6)]
    cb = resolve_targets(lambda words, toks: [w.tokens for w in words if w.text == "on"], ws, 8)
    assert cb[0].tokens == (5,)
    named = resolve_targets(lambda words, toks: [Target("two dogs", (1, 4)), 6], ws, 8)
    assert named == [Target("two dogs", (1, 4)), Target("6", (6,))]   # an index: its token
    with pytest.raises(ValueError, match="out of range"):
        resolve_targets(lambda words, toks: [Target("x", (9,))], ws, 8)
    with pytest.raises(ValueError, match="'cat' is not in the answer.*'grass'"):
        resolve_targets(["cat"], ws, 8)
    with pytest.raises(ValueError, match="out of range"):
        resolve_targets([8], ws, 8)


def test_phrase_targets():
    """A multi-word target is a phrase: the tokens of all its occurrences, punctuation-only
    words skipped, words of several tokens whole."""
    ws = group_words([" A", " red", " bus", "es", " ,", " a", " red", " car", " and", " a",
                      " dog"])
    assert [w.text for w in ws] == ["A", "red", "buses", ",", "a", "red", "car", "and", "a",
                                    "dog"]
    assert resolve_targets(["a red buses"], ws, 11) == [Target("a red buses", (0, 1, 2, 3))]
    assert resolve_targets("a red", ws, 11) == [Target("a red", (0, 1, 5, 6))]
    assert resolve_targets(["buses, a red car"], ws, 11)[0].tokens == (2, 3, 5, 6, 7)  # no ","
    # a single word keeps its meaning; a phrase and a word can be mixed
    got = resolve_targets(["dog", "red car"], ws, 11)
    assert got == [Target("dog", (10,)), Target("red car", (6, 7))]
    with pytest.raises(ValueError, match="target phrase 'red dog' is not in the answer"):
        resolve_targets(["red dog"], ws, 11)
    with pytest.raises(ValueError, match="target word 'cat'"):
        resolve_targets(["cat"], ws, 11)


def test_repeated_function_words():
    from diffcam.attribution.targets import (Word, is_function_word,
                                             repeated_function_words)

    ws = [Word(t, (i,)) for i, t in enumerate(
        "The dog , the cat , and a bird on the mat .".split())]
    got = [(w.text, w.tokens) for w in repeated_function_words(ws)]
    # "the" three times (case-insensitive), "," twice; "and", "a", "on", "." once each
    assert got == [("The", (0,)), (",", (2,)), ("the", (3,)), (",", (5,)), ("the", (10,))]
    assert all(is_function_word(w) for w in ("of", "is", "Their", ";"))
    assert not any(is_function_word(w) for w in ("dog", "two", "left", "image", ""))
    assert repeated_function_words([]) == []
