"""Task generation: deterministic, token lengths on target, answers planted, RULER scorers."""

from __future__ import annotations

import pytest

from mdkv_compile import assets
from mdkv_compile.eval import tasks as T


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets.smollm2_dir()), gguf_file=assets.SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def hay() -> str:
    return assets.haystack_text()


def _n_tokens(tok, inst: T.TaskInstance, style: str) -> int:
    ctx, second = T.encode(tok, inst, style)
    return len(ctx) + (0 if inst.task in T.CONTINUATION_TASKS else len(second))


@pytest.mark.parametrize("style", T.PROMPT_STYLES)
@pytest.mark.parametrize("length", [512, 2048])
@pytest.mark.parametrize("task", list(T.TASKS))
def test_lengths_within_tolerance(tok, hay, task: str, length: int, style: str) -> None:
    inst = T.make_instance(task, tok, length, seed=1, depth=0.4 if task == "niah" else None, haystack=hay,
                           prompt_style=style)  # fmt: skip
    n = _n_tokens(tok, inst, style)
    if task in T.CONTINUATION_TASKS:  # the prefix is an exact token slice; decode/encode may merge one seam
        assert abs(n - length) <= 2
        assert abs(len(T.encode(tok, inst, style)[1]) - 256) <= 2
    else:
        assert length - T.length_tolerance(length) <= n <= length, (task, n)


@pytest.mark.parametrize("task", list(T.TASKS))
def test_deterministic_and_seeded(tok, hay, task: str) -> None:
    depth = 0.5 if task == "niah" else None
    a = T.make_instance(task, tok, 768, seed=3, depth=depth, haystack=hay)
    b = T.make_instance(task, tok, 768, seed=3, depth=depth, haystack=hay)
    assert a == b
    c = T.make_instance(task, tok, 768, seed=4, depth=0.6 if task == "niah" else None, haystack=hay)
    assert (c.context, c.answers) != (a.context, a.answers)


@pytest.mark.parametrize("task", [t for t in T.TASKS if t not in T.CONTINUATION_TASKS])
def test_answers_are_in_the_context(tok, hay, task: str) -> None:
    inst = T.make_instance(task, tok, 1024, seed=0, depth=0.3 if task == "niah" else None, haystack=hay)
    assert inst.answers and inst.max_new_tokens > 0
    for a in inst.answers:
        assert a in inst.context
    # the context alone does not reveal the answer in the question (it asks, not tells)
    if task in ("niah", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"):
        assert not any(a in inst.question for a in inst.answers)


def test_niah_depth_places_the_needle(tok, hay) -> None:
    shallow = T.make_instance("niah", tok, 2048, depth=0.1, haystack=hay)
    deep = T.make_instance("niah", tok, 2048, depth=0.9, haystack=hay)
    pos = lambda inst: inst.context.index("The special magic number is") / len(inst.context)
    assert pos(shallow) < 0.2 < 0.8 < pos(deep)


def test_task_specific_structure(tok, hay) -> None:
    cwe = T.make_instance("cwe", tok, 1024, seed=0, haystack=hay)
    words = [line.split(". ", 1)[1] for line in cwe.context.splitlines() if ". " in line and line[0].isdigit()]
    counts = {w: words.count(w) for w in set(words)}
    assert all(counts[w] == cwe.meta["freq_cw"] for w in cwe.answers)
    assert max(c for w, c in counts.items() if w not in cwe.answers) < cwe.meta["freq_cw"]
    fwe = T.make_instance("fwe", tok, 1024, seed=0, haystack=hay)
    assert len(fwe.answers) == 3 and fwe.meta["counts"] == sorted(fwe.meta["counts"], reverse=True)
    vt = T.make_instance("vt", tok, 1024, seed=0, haystack=hay)
    assert len(vt.answers) == 5
    # the chain is in order: each VAR line refers to the previous variable
    for prev, cur in zip(vt.answers, vt.answers[1:], strict=False):
        assert vt.context.index(f"VAR {prev} ") < vt.context.index(f"VAR {cur} = VAR {prev}")


def test_chat_style_wraps_the_template(tok, hay) -> None:
    inst = T.make_instance("niah_single", tok, 512, haystack=hay, prompt_style="chat")
    assert inst.context.startswith("<|im_start|>")
    assert "<|im_start|>assistant" in inst.question


def test_scorers() -> None:
    assert T.string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert T.string_match_all("just 123", ["123", "456"]) == 0.5
    assert T.string_match_all("ABCDE fghij", ["abcde", "FGHIJ", "zzz", "yyy"]) == 0.5
    assert T.string_match_part("nothing", ["a1", "b2"]) == 0.0
    assert T.string_match_part("it is b2", ["a1", "b2"]) == 1.0
    with pytest.raises(ValueError):
        T.string_match_all("x", [])


def test_errors_and_grid(tok, hay) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        T.make_instance("nope", tok, 512, haystack=hay)
    with pytest.raises(ValueError, match="too short"):
        T.make_instance("niah_multiquery", tok, 64, haystack=hay)
    pts = T.grid(["niah", "vt"], [512, 1024], [0.0, 1.0], [0, 1, 2])
    assert len(pts) == 2 * 2 + 2 * 3
    assert ("niah", 512, 0, 0.0) in pts and ("vt", 1024, 2, None) in pts
