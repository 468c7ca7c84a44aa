"""Synthetic long-context tasks: NIAH grid, RULER-style tasks and compressed-context perplexity.

Every instance is a pure function of (task, target length, seed, depth, tokenizer, haystack): the
same arguments give the same text, so results can be resumed and compared across methods. Lengths
are targeted in *tokens of the model's own tokenizer* (the prompt = context + question lands
within `length_tolerance(length)` below the target, never above).

An instance is split in two texts, as in kvpress:

- `context`: what is compressed in the query-agnostic protocol (instructions, haystack, needles);
- `question`: the query and the answer prefix, prefilled after the context.

Query-aware evaluation prefills `context + question` in one forward (the question then sits in
the observation window, which favours SnapKV-like methods); query-agnostic evaluation prefills and
compresses the context first and only then prefills the question as a chunk. Both see exactly the
same token ids (`encode` tokenises the two parts separately and concatenates).

Task definitions follow RULER (Hsieh et al., 2024; the templates in its `synthetic.yaml`), with
these adaptations to run offline on small models: keys and words come from the Paul Graham
essays' own vocabulary (RULER draws them from the `wonderwords` package), common-words extraction
scales its word frequencies with the context length, and the NIAH grid uses the single needle
"The special magic number is NNNNNNN." (the classic gkamradt / kvpress setup).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from mdkv_compile import assets

# task name -> family (the report groups scores by family)
TASKS: dict[str, str] = {
    "niah": "niah",  # grid over lengths x depths, one needle
    "niah_single": "ruler",
    "niah_multikey": "ruler",
    "niah_multivalue": "ruler",
    "niah_multiquery": "ruler",
    "vt": "ruler",  # variable tracking
    "cwe": "ruler",  # common-words extraction
    "fwe": "ruler",  # frequent-words extraction
    "ppl": "ppl",  # compressed-context perplexity (lower is better)
    "kl": "kl",  # KL(full || compressed) of the next-token distributions of a continuation (lower is better)
}
RULER_TASKS = tuple(t for t, f in TASKS.items() if f == "ruler")
# Tasks that teacher-force a true continuation after the compressed context instead of generating.
CONTINUATION_TASKS = ("ppl", "kl")
PROMPT_STYLES = ("continuation", "chat")
PROTOCOLS = ("query-agnostic", "query-aware")

# Generation lengths per task (tokens). SmolLM2 writes each digit as one token, so a 7-digit
# number plus a few words fits in 16; list answers need more.
MAX_NEW_TOKENS: dict[str, int] = {
    "niah": 16,
    "niah_single": 16,
    "niah_multikey": 16,
    "niah_multivalue": 48,
    "niah_multiquery": 48,
    "vt": 32,
    "cwe": 96,
    "fwe": 32,
    "ppl": 0,
    "kl": 0,
}

VT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"


def length_tolerance(length: int) -> int:
    """How far below the target a prompt may land (tokens): whole words/needles are not split."""
    return max(24, length // 50)


@dataclass(frozen=True)
class TaskInstance:
    task: str
    length: int  # target prompt length in tokens (context + question; ppl, kl: context only)
    seed: int
    depth: float | None  # needle depth in [0, 1] for the NIAH grid, else None
    context: str
    question: str
    answers: tuple[str, ...]
    max_new_tokens: int
    stop_at_newline: bool = False  # single-line answers: stop decoding at the first newline
    continuation: str = ""  # ppl, kl: the true continuation that is teacher-forced and scored
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def family(self) -> str:
        return TASKS[self.task]

    @property
    def variant(self) -> str:
        """The part of a result key that tells grid points apart: depth (NIAH grid) or seed."""
        return f"d{self.depth:.2f}" if self.depth is not None else f"s{self.seed}"

    def score(self, prediction: str) -> float:
        return string_match_all(prediction, self.answers)


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's metric: the fraction of expected strings found (case-insensitive) in the output."""
    if not answers:
        raise ValueError("string_match_all needs at least one expected answer")
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """RULER's QA metric: 1 if any of the acceptable answers is found."""
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


# --- haystack helpers ---------------------------------------------------------------------------


def default_haystack() -> str:
    return assets.haystack_text()


@lru_cache(maxsize=4)
def _hay_ids(tok: Any, haystack: str) -> tuple[int, ...]:
    return tuple(tok(haystack, add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=4)
def _vocab(text: str) -> tuple[str, ...]:
    """Distinct plain lowercase words of the haystack: keys and word lists are drawn from them."""
    return tuple(sorted({w for w in re.findall(r"\b[a-z]{4,10}\b", text)}))


def _count(tok: Any, ctx: str, question: str, special: bool) -> int:
    return len(tok(ctx, add_special_tokens=special)["input_ids"]) + len(
        tok(question, add_special_tokens=False)["input_ids"]
    )


def _fit(
    build: Callable[[int], tuple[str, str]], tok: Any, target: int, hi: int, special: bool
) -> tuple[str, str, int]:
    """(context, question, n) for the largest filler size n in [0, hi] whose prompt has <= target
    tokens (bisection: the token count grows with n, up to tokenizer merges at the seams)."""
    lo_n, hi_n = 0, hi
    best: tuple[str, str, int] | None = None
    while lo_n <= hi_n:
        mid = (lo_n + hi_n) // 2
        ctx, q = build(mid)
        if _count(tok, ctx, q, special) <= target:
            best = (ctx, q, mid)
            lo_n = mid + 1
        else:
            hi_n = mid - 1
    if best is None:
        ctx, q = build(0)
        raise ValueError(
            f"target length {target} tokens is too short: the task's fixed text alone needs "
            f"{_count(tok, ctx, q, special)} tokens"
        )
    return best


class _Prompt:
    """Wraps instruction/context/question into a continuation or chat prompt."""

    MARK = "\x00MDKV\x00"

    def __init__(self, tok: Any, style: str) -> None:
        if style not in PROMPT_STYLES:
            raise ValueError(f"prompt style {style!r} is not one of {PROMPT_STYLES}")
        self.style = style
        self.pre, self.post = "", ""
        if style == "chat":
            if not getattr(tok, "chat_template", None):
                raise ValueError("prompt style 'chat' needs a tokenizer with a chat template")
            rendered = tok.apply_chat_template(
                [{"role": "user", "content": self.MARK}], tokenize=False, add_generation_prompt=True
            )
            self.pre, self.post = rendered.split(self.MARK)

    @property
    def special(self) -> bool:
        # the chat template writes its own special tokens; raw text gets the tokenizer's BOS (if any)
        return self.style != "chat"

    def split(self, context: str, question: str, answer_prefix: str) -> tuple[str, str]:
        if self.style == "chat":
            return self.pre + context, question + self.post + answer_prefix.lstrip()
        return context, question + answer_prefix


def _insert_at_sentences(tok: Any, hay: Sequence[int], needles: Sequence[str], depths: Sequence[float]) -> str:
    """Decode `hay` with each needle inserted at the sentence end at or before its depth."""
    positions = []
    for d in depths:
        p = int(len(hay) * d)
        # back up to just after a '.' so a needle never splits a sentence (gkamradt's rule)
        while p > 0 and not tok.decode(hay[p - 1 : p]).rstrip().endswith("."):
            p -= 1
        positions.append(p)
    order = sorted(range(len(needles)), key=lambda i: positions[i])
    parts, prev = [], 0
    for i in order:
        parts.append(tok.decode(hay[prev : positions[i]]))
        parts.append(" " + needles[i].strip() + " ")
        prev = positions[i]
    parts.append(tok.decode(hay[prev:]))
    return "".join(parts)


def _hay_offset(rng: random.Random, seed: int, total: int, need: int) -> int:
    # seed 0 starts at the first essay (the classic haystack); other seeds start elsewhere
    return 0 if seed == 0 else rng.randrange(0, max(1, total - need))


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _keys(rng: random.Random, vocab: Sequence[str], n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        k = f"{rng.choice(vocab)}-{rng.choice(vocab)}"
        if k not in keys:
            keys.append(k)
    return keys


# --- task builders ------------------------------------------------------------------------------

_RULER_NIAH_PRE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)


def _niah_family(
    task: str,
    tok: Any,
    length: int,
    seed: int,
    depth: float | None,
    haystack: str,
    prompt: _Prompt,
    rng: random.Random,
) -> TaskInstance:
    hay_all = _hay_ids(tok, haystack)
    vocab = _vocab(haystack)
    if task == "niah":
        value = _number(rng)
        needles = [f"The special magic number is {value}."]
        depths = [0.5 if depth is None else depth]
        pre = ""
        question = "\n\nWhat is the special magic number mentioned in the text above?"
        answer_prefix = " The special magic number is"
        answers = (value,)
    else:
        n_keys = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 1, "niah_multiquery": 4}[task]
        keys = _keys(rng, vocab, n_keys)
        if task == "niah_multivalue":
            values = [_number(rng) for _ in range(4)]
            needles = [f"One of the special magic numbers for {keys[0]} is: {v}." for v in values]
        else:
            values = [_number(rng) for _ in keys]
            needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values, strict=True)]
        depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
        rng.shuffle(needles)  # which needle sits where is random too
        pre = _RULER_NIAH_PRE
        if task in ("niah_single", "niah_multikey"):
            qi = rng.randrange(len(keys))
            query, answers = keys[qi], (values[qi],)
            question = f"\nWhat is the special magic number for {query} mentioned in the provided text?"
            answer_prefix = f" The special magic number for {query} mentioned in the provided text is"
        elif task == "niah_multivalue":
            query, answers = keys[0], tuple(values)
            question = f"\nWhat are all the special magic numbers for {query} mentioned in the provided text?"
            answer_prefix = f" The special magic numbers for {query} mentioned in the provided text are"
        else:
            query = ", ".join(keys)
            answers = tuple(values)
            question = f"\nWhat are all the special magic numbers for {query} mentioned in the provided text?"
            answer_prefix = f" The special magic numbers for {query} mentioned in the provided text are"
    off = _hay_offset(rng, seed, len(hay_all), length)

    def build(n: int) -> tuple[str, str]:
        hay = hay_all[off : off + n]
        ctx = pre + _insert_at_sentences(tok, hay, needles, depths)
        return prompt.split(ctx, question, answer_prefix)

    ctx, q, _ = _fit(build, tok, length, min(length, len(hay_all) - off), prompt.special)
    return TaskInstance(
        task,
        length,
        seed,
        depth if task == "niah" else None,
        ctx,
        q,
        answers,
        MAX_NEW_TOKENS[task],
        stop_at_newline=task in ("niah", "niah_single", "niah_multikey"),
    )


def _vt(tok: Any, length: int, seed: int, prompt: _Prompt, rng: random.Random) -> TaskInstance:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names: list[str] = []
    while len(names) < 5:  # one chain, four hops (RULER's default)
        n = "".join(rng.choice(letters) for _ in range(5))
        if n not in names:
            names.append(n)
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
    fracs = sorted(rng.random() for _ in chain)  # relative positions, chain order preserved
    pre = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    question = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    answer_prefix = (
        f" Answer: According to the chain(s) of variable assignment in the text above, 5 variables "
        f"are assigned the value {value}, they are:"
    )

    def build(n: int) -> tuple[str, str]:
        lines = [VT_NOISE] * n
        for stmt, f in sorted(zip(chain, fracs, strict=True), key=lambda x: -x[1]):
            lines.insert(int(f * n), stmt + "\n")
        return prompt.split(pre + "".join(lines), question, answer_prefix)

    ctx, q, _ = _fit(build, tok, length, length // 4 + 1, prompt.special)
    return TaskInstance("vt", length, seed, None, ctx, q, tuple(names), MAX_NEW_TOKENS["vt"])


def _cwe(tok: Any, length: int, seed: int, haystack: str, prompt: _Prompt, rng: random.Random) -> TaskInstance:
    vocab = list(_vocab(haystack))
    rng.shuffle(vocab)
    common, pool = vocab[:10], vocab[10:]
    # RULER uses 30 vs 3 occurrences at 4K+; shorter contexts scale both down (keeping a 4x+ gap)
    freq_cw = max(4, min(30, length // 250))
    freq_ucw = max(1, freq_cw // 10)
    shuffle_seed = rng.randrange(2**31)
    pre = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n"
    )
    question = "\nQuestion: What are the 10 most common words in the above list?"
    answer_prefix = " Answer: The top 10 words that appear most often in the list are:"

    def build(n: int) -> tuple[str, str]:
        words = common * freq_cw + pool[:n] * freq_ucw
        random.Random(shuffle_seed).shuffle(words)
        body = "".join(f"{i + 1}. {w}\n" for i, w in enumerate(words))
        return prompt.split(pre + body, question, answer_prefix)

    ctx, q, _ = _fit(build, tok, length, min(len(pool), length), prompt.special)
    return TaskInstance(
        "cwe",
        length,
        seed,
        None,
        ctx,
        q,
        tuple(common),
        MAX_NEW_TOKENS["cwe"],
        meta={"freq_cw": freq_cw, "freq_ucw": freq_ucw},
    )


def _fwe(tok: Any, length: int, seed: int, prompt: _Prompt, rng: random.Random) -> TaskInstance:
    letters = "abcdefghijklmnopqrstuvwxyz"
    coded = sorted({"".join(rng.choice(letters) for _ in range(5)) for _ in range(200)})
    rng.shuffle(coded)
    # Zipf(alpha=2) over the coded vocabulary, as RULER; ranks fixed by the shuffled order
    weights = [1.0 / (r + 1) ** 2 for r in range(len(coded))]
    stream_seed = rng.randrange(2**31)
    pre = (
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. "
    )
    question = (
        "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three "
        "most frequently appeared words in the above coded text?"
    )
    answer_prefix = " Answer: According to the coded text above, the three most frequently appeared words are:"
    cache: dict[int, list[str]] = {}

    def words_for(n: int) -> list[str]:
        if n not in cache:
            r = random.Random(stream_seed)
            cache[n] = r.choices(coded, weights=weights, k=n)
        return cache[n]

    def build(n: int) -> tuple[str, str]:
        ws = words_for(n)
        body = " ".join(w if (i + 1) % 10 else w + " ...." for i, w in enumerate(ws))
        return prompt.split(pre + body, question, answer_prefix)

    ctx, q, n_words = _fit(build, tok, length, length, prompt.special)
    # the answers are the measured top 3 of the text actually produced (ties broken by rank)
    counts: dict[str, int] = {}
    for w in words_for(n_words):
        counts[w] = counts.get(w, 0) + 1
    top = sorted(counts, key=lambda w: (-counts[w], coded.index(w)))[:3]
    return TaskInstance(
        "fwe",
        length,
        seed,
        None,
        ctx,
        q,
        tuple(top),
        MAX_NEW_TOKENS["fwe"],
        meta={"counts": [counts[w] for w in top]},
    )


def _continuation(
    task: str, tok: Any, length: int, seed: int, haystack: str, rng: random.Random, ppl_tokens: int
) -> TaskInstance:
    """`length` haystack tokens as the context and the next `ppl_tokens` as the continuation."""
    hay = _hay_ids(tok, haystack)
    need = length + ppl_tokens
    if need > len(hay):
        raise ValueError(f"{task} needs {need} haystack tokens, the haystack has {len(hay)}")
    off = _hay_offset(rng, seed, len(hay), need)
    # the continuation is kept as the exact token slice (decode -> encode round trip checked below)
    ctx = tok.decode(hay[off : off + length])
    cont = tok.decode(hay[off + length : off + need])
    return TaskInstance(
        task,
        length,
        seed,
        None,
        ctx,
        "",
        (),
        0,
        continuation=cont,
        meta={"ppl_tokens": ppl_tokens, "offset": off},
    )


def make_instance(
    task: str,
    tok: Any,
    length: int,
    seed: int = 0,
    depth: float | None = None,
    haystack: str | None = None,
    prompt_style: str = "continuation",
    ppl_tokens: int = 256,
) -> TaskInstance:
    """One task instance, deterministic in all its arguments."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if length < 64:
        raise ValueError(f"length={length} is too short; use at least 64 tokens")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    haystack = default_haystack() if haystack is None else haystack
    # one RNG per (task, length, seed, depth): instances do not depend on which others were made
    rng = random.Random(f"{task}|{length}|{seed}|{depth}")
    prompt = _Prompt(tok, prompt_style)
    if task.startswith("niah"):
        return _niah_family(task, tok, length, seed, depth, haystack, prompt, rng)
    if task == "vt":
        return _vt(tok, length, seed, prompt, rng)
    if task == "cwe":
        return _cwe(tok, length, seed, haystack, prompt, rng)
    if task == "fwe":
        return _fwe(tok, length, seed, prompt, rng)
    return _continuation(task, tok, length, seed, haystack, rng, ppl_tokens)


def encode(tok: Any, inst: TaskInstance, prompt_style: str = "continuation") -> tuple[list[int], list[int]]:
    """Token ids of the context and of the question (or, for ppl and kl, of the continuation)."""
    special = prompt_style != "chat"
    ctx = tok(inst.context, add_special_tokens=special)["input_ids"]
    second = inst.continuation if inst.task in CONTINUATION_TASKS else inst.question
    return list(ctx), list(tok(second, add_special_tokens=False)["input_ids"])


def grid(
    tasks: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float],
    seeds: Sequence[int],
) -> list[tuple[str, int, int, float | None]]:
    """(task, length, seed, depth) points: the NIAH grid varies depth, other tasks vary seed."""
    points: list[tuple[str, int, int, float | None]] = []
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        for length in lengths:
            if task == "niah":
                points += [(task, length, seeds[0] if seeds else 0, float(d)) for d in depths]
            else:
                points += [(task, length, s, None) for s in seeds]
    return points
