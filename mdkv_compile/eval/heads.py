"""`mdkv profile-heads`: HeadKV's retrieval-reasoning head scores for any HF causal LM.

Our own implementation of the head-importance profiling of HeadKV (Fu et al., ICLR 2025, "Not All
Heads Matter"), which extends the retrieval-head score of Wu et al. (2024, "Retrieval Head
Mechanistically Explains Long-Context Factuality"). Both plant a needle in a Paul Graham essay
haystack, let the model answer a question about it by greedy decoding, and watch, at every
decoding step, where each query head's attention row (the newest query against all keys) goes:

- ``retrieval`` (Wu et al.): a head scores 1/|needle| at a step when its arg-max key lies in the
  needle *and* that key's token is the token being generated (it copies). Per probe, summed over
  the decoding steps.
- ``retrieval_reasoning`` (HeadKV-R2, the default): the needle holds two candidate answers and a
  reasoning cue that tells which is right; only the span with the right answer (the *real needle*)
  counts. Instead of the arg-max, the top-k keys of each head's row are taken, k = |real needle|,
  and every top-k key inside the real needle adds its attention weight:
  ``10 * a / (|real needle| * |answer tokens|)``. No copy condition: a head that gathers the
  relevant span counts even when it does not copy.

As in both papers, a probe contributes only if the model answered it (token F1 of the answer above
``min_f1``, HeadKV: 0.5), decoding stops after as many tokens as the gold answer has, and a
head's final score is its mean over the contributing probes. Prompt as in HeadKV's script:
``<haystack with needle>\\n\\nBased on the content of the book, Question: <q>\\nAnswer:``, to
which we add an answer prefix that restates the question (``The secret code of ... is``): small
instruct models otherwise open with a newline or a role token and never answer. The
prompt minus its last token is prefilled without attention weights, and decoding runs with the
eager attention (``output_attentions=True``), which returns one row per head per step.

What differs from HeadKV's script, and why:

- Probes are generated here (HeadKV ships a fixed ``needles.jsonl`` derived from QA data): four
  reasoning templates (whose code / how many coins / which city / which colour) with random
  names, numbers and places, at random depths and given lengths, so any model and tokenizer can
  be profiled offline and deterministically (``--seed``).
- A small model may answer too few probes: when fewer than ``min_probes`` pass the F1 filter,
  all probes are used and the JSON says so (``meta.success_filter``).
- The needle span is located exactly (the prompt is tokenised in segments) rather than by
  token-overlap search.

Scores are per *query* head, ``scores[layer][head]``; MixedDimKV-H and HeadKV aggregate them to KV
heads (mean over the GQA group).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mdkv_compile import assets
from mdkv_compile.usage import (
    as_usage_error,
    command,
    csv,
    device,
    non_negative_int,
    positive_int,
    unit_interval,
    writable_file,
)

SCORING = ("retrieval_reasoning", "retrieval")
QUESTION_TEMPLATE = "\n\nBased on the content of the book, Question: {q}\nAnswer: {prefix}"

_NAMES = ["Alice", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ingrid", "Jonas",
          "Keiko", "Liam", "Marta", "Nikos", "Olga", "Pavel", "Quinn", "Rosa", "Stefan", "Tara"]  # fmt: skip
_COLORS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
_CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Vienna", "Dakar", "Perth"]
_OBJECTS = ["box", "chest", "jar", "crate", "basket"]


@dataclass(frozen=True)
class Probe:
    before: str  # needle text before the real needle
    real: str  # the span holding the right answer (scored)
    after: str  # needle text after it (distractor, reasoning cue)
    question: str
    answer: str
    prefix: str  # answer prefix: small instruct models otherwise open with a newline or role token
    length: int
    depth: float


def _reasoning_needle(rng: random.Random) -> tuple[str, str, str, str, str, str]:
    """(before, real, after, question, answer, prefix): two candidates, one reasoning cue."""
    kind = rng.randrange(4)
    a, b = rng.sample(_NAMES, 2)
    x, y = (str(rng.randrange(1000, 10000)) for _ in range(2))
    right_first = rng.random() < 0.5
    if kind == 0:
        fact = {a: f"{a}'s secret code is {x}.", b: f"{b}'s secret code is {y}."}
        color = rng.choice(_COLORS)
        who = a if right_first else b
        cue = f"{who} is the one who lives in the {color} house."
        q = f"What is the secret code of the person who lives in the {color} house?"
        prefix = f"The secret code of the person who lives in the {color} house is"
        ans = x if who == a else y
        real, other = fact[who], fact[b if who == a else a]
    elif kind == 1:
        obj = rng.choice(_OBJECTS)
        c1, c2 = rng.sample(_COLORS, 2)
        fact = {c1: f"The {c1} {obj} holds {x} coins.", c2: f"The {c2} {obj} holds {y} coins."}
        right = c1 if right_first else c2
        cue = f"The {right} {obj} is the one on the top shelf."
        q = f"How many coins are in the {obj} on the top shelf?"
        prefix = f"The number of coins in the {obj} on the top shelf is"
        ans = x if right == c1 else y
        real, other = fact[right], fact[c2 if right == c1 else c1]
    elif kind == 2:
        p, r = rng.sample(_CITIES, 2)
        fact = {a: f"{a} was born in {p}.", b: f"{b} was born in {r}."}
        sibling = rng.choice([n for n in _NAMES if n not in (a, b)])
        who = a if right_first else b
        cue = f"{who} is the older sister of {sibling}."
        q = f"In which city was the older sister of {sibling} born?"
        prefix = f"The older sister of {sibling} was born in"
        ans = p if who == a else r
        real, other = fact[who], fact[b if who == a else a]
    else:
        c1, c2 = rng.sample(_COLORS, 2)
        fact = {a: f"{a} painted the door {c1}.", b: f"{b} painted the door {c2}."}
        who = a if right_first else b
        cue = f"The door that {who} painted is the one the visitor saw."
        q = "What colour was the door the visitor saw?"
        prefix = "The door the visitor saw was painted"
        ans = c1 if who == a else c2
        real, other = fact[who], fact[b if who == a else a]
    # the distractor and the cue sit on either side so position alone does not give the answer
    if rng.random() < 0.5:
        return f"{other} ", real, f" {cue}", q, ans, prefix
    return "", real, f" {other} {cue}", q, ans, prefix


def _retrieval_needle(rng: random.Random) -> tuple[str, str, str, str, str, str]:
    key = f"{rng.choice(_COLORS)}-{rng.choice(_CITIES).lower()}"
    x = str(rng.randrange(1000, 10000))
    q = f"What is the special magic number for {key}?"
    return "", f"The special magic number for {key} is {x}.", "", q, x, f"The special magic number for {key} is"


def make_probes(n: int, lengths: Sequence[int], scoring: str, seed: int = 0) -> list[Probe]:
    rng = random.Random(f"profile-heads|{scoring}|{seed}")
    probes = []
    for i in range(n):
        needle = _reasoning_needle(rng) if scoring == "retrieval_reasoning" else _retrieval_needle(rng)
        depth = round(rng.uniform(0.05, 0.95), 3)
        probes.append(Probe(*needle, length=int(lengths[i % len(lengths)]), depth=depth))
    return probes


def _tokens(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def build_prompt(tok: Any, probe: Probe, hay_ids: Sequence[int], offset: int = 0) -> tuple[list[int], int, int]:
    """Token ids of the probe prompt and the [start, end) span of the real needle in them.

    Tokenised in segments (haystack-before, needle-before, real needle, needle-after,
    haystack-after, question) so the span is exact."""
    q_ids = _tokens(tok, QUESTION_TEMPLATE.format(q=probe.question, prefix=probe.prefix))
    pre = _tokens(tok, " " + probe.before) if probe.before else []
    real = _tokens(tok, " " + probe.real)
    post = _tokens(tok, probe.after + " ") if probe.after else _tokens(tok, " ")
    first = list(tok("a")["input_ids"][:1])
    bos = first if tok.bos_token_id is not None and first == [tok.bos_token_id] else []
    n_hay = probe.length - len(q_ids) - len(pre) - len(real) - len(post) - len(bos)
    if n_hay < 16:
        raise ValueError(f"probe length {probe.length} is too short for its needle and question")
    if offset + n_hay > len(hay_ids):
        raise ValueError(f"haystack has {len(hay_ids)} tokens, a probe needs {offset + n_hay}")
    hay = list(hay_ids[offset : offset + n_hay])
    cut = int(n_hay * probe.depth)
    # move the needle to a sentence end so it does not split a sentence
    while cut > 0 and not tok.decode(hay[cut - 1 : cut]).rstrip().endswith("."):
        cut -= 1
    ids = bos + hay[:cut] + pre
    start = len(ids)
    ids += real
    end = len(ids)
    ids += post + hay[cut:] + q_ids
    return ids, start, end


def qa_f1(prediction: str, answer: str) -> float:
    """Token-level F1 after lower-casing and stripping punctuation and articles (LongBench's)."""

    def norm(s: str) -> list[str]:
        s = re.sub(r"\b(a|an|the)\b", " ", re.sub(r"[^\w\s]", " ", s.lower()))
        return s.split()

    p, g = norm(prediction), norm(answer)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


@contextlib.contextmanager
def attn_implementation(model: Any, name: str) -> Iterator[None]:
    """Switch the model's attention implementation, restoring the previous one on exit."""
    old = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


@torch.no_grad()
def score_probe(
    model: Any, tok: Any, ids: Sequence[int], start: int, end: int, answer: str, scoring: str
) -> tuple[torch.Tensor, str]:
    """(L, Hq) score of one probe and the model's answer."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    n_ans = len(_tokens(tok, " " + answer))
    span = end - start
    x = torch.tensor([list(ids)], device=device)
    cache = DynamicCache(config=model.config)
    # the prefill needs no weights: the fast kernel when the model has one
    with attn_implementation(model, "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"):
        model(input_ids=x[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    score = torch.zeros(L, H, dtype=torch.float64)
    inp = x[:, -1:]
    out_tokens: list[int] = []
    prompt = x[0]
    with attn_implementation(model, "eager"):
        for _ in range(n_ans):
            out = model(input_ids=inp, past_key_values=cache, use_cache=True, output_attentions=True)
            nxt = int(out.logits[0, -1].argmax())
            out_tokens.append(nxt)
            # (L, H, T): the newest query's attention row of every head
            rows = torch.stack([a[0, :, -1, :] for a in out.attentions]).double().cpu()
            if scoring == "retrieval_reasoning":
                vals, idx = rows.topk(span, dim=-1)
                inside = (idx >= start) & (idx < end)
                score += (10.0 * vals * inside).sum(-1) / (span * n_ans)
            else:
                arg = rows.argmax(-1)
                copies = (arg >= start) & (arg < end) & (prompt.cpu()[arg.clamp(max=len(prompt) - 1)] == nxt)
                score += copies.double() / span
            inp = torch.tensor([[nxt]], device=device)
    return score, tok.decode(out_tokens, skip_special_tokens=True)


def profile_heads(
    model: Any,
    tok: Any,
    haystack: str,
    n_probes: int = 24,
    lengths: Sequence[int] = (1024, 2048),
    scoring: str = "retrieval_reasoning",
    seed: int = 0,
    min_f1: float = 0.5,
    min_probes: int = 1,
    model_name: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the probes and return the JSON document (see the module docstring)."""
    from tqdm.auto import tqdm

    if scoring not in SCORING:
        raise ValueError(f"scoring {scoring!r} is not one of {SCORING}")
    if n_probes < 1:
        raise ValueError("n_probes must be >= 1")
    cfg = model.config
    hay_ids = list(tok(haystack, add_special_tokens=False)["input_ids"])
    probes = make_probes(n_probes, lengths, scoring, seed)
    rng = random.Random(f"offsets|{seed}")
    per_probe: list[torch.Tensor] = []
    passed: list[bool] = []
    answers: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    bar = tqdm(probes, desc=f"profile-heads ({scoring})", unit="probe", disable=not progress)
    for probe in bar:
        offset = rng.randrange(0, max(1, len(hay_ids) - probe.length))
        ids, start, end = build_prompt(tok, probe, hay_ids, offset)
        s, pred = score_probe(model, tok, ids, start, end, probe.answer, scoring)
        f1 = qa_f1(pred, probe.answer)
        per_probe.append(s)
        passed.append(f1 > min_f1)
        answers.append({"answer": probe.answer, "prediction": pred, "f1": round(f1, 3), "length": len(ids)})
        bar.set_postfix_str(f"answered {sum(passed)}/{len(passed)}")
    bar.close()
    used = [s for s, ok in zip(per_probe, passed, strict=True) if ok]
    if len(used) >= min_probes:
        filt = f"F1 > {min_f1}: {len(used)} of {len(per_probe)} probes"
    else:
        used = per_probe
        filt = (f"disabled: only {sum(passed)} of {len(per_probe)} probes had F1 > {min_f1} "
                f"(fewer than {min_probes}); all probes used")  # fmt: skip
        print(f"profile-heads: warning: {filt}", file=sys.stderr)
    scores = torch.stack(used).mean(0)
    if not bool((scores > 0).any()):
        raise RuntimeError("every head scored 0: no head attended to the needle; try longer decoding or more probes")
    return {
        "model": model_name or getattr(cfg, "name_or_path", "") or type(model).__name__,
        "num_layers": int(cfg.num_hidden_layers),
        "num_attention_heads": int(cfg.num_attention_heads),
        "num_key_value_heads": int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
        "method": scoring,
        "scores": [[float(v) for v in row] for row in scores.tolist()],
        "meta": {
            "probes": len(per_probe),
            "probes_used": len(used),
            "success_filter": filt,
            "lengths": list(lengths),
            "seed": seed,
            "seconds": round(time.perf_counter() - t0, 1),
            "answers": answers,
        },
    }


def validate_scores(doc: dict[str, Any]) -> None:
    """Raise ValueError unless `doc` has the head-scores layout the policies read."""
    for k in ("model", "num_layers", "num_attention_heads", "num_key_value_heads", "method", "scores"):
        if k not in doc:
            raise ValueError(f"head scores: missing key {k!r}")
    L, H = doc["num_layers"], doc["num_attention_heads"]
    s = doc["scores"]
    if len(s) != L or any(len(row) != H for row in s):
        raise ValueError(f"head scores: 'scores' must be {L} rows of {H} floats")
    if H % doc["num_key_value_heads"]:
        raise ValueError("head scores: num_attention_heads must be a multiple of num_key_value_heads")


# --- command line --------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2' (offline GGUF) or a Hugging Face path")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--scoring", choices=SCORING, default="retrieval_reasoning")
    p.add_argument("--probes", type=positive_int, default=24, help="number of needle probes")
    p.add_argument("--lengths", type=csv(positive_int), default="1024,2048",
                   help="probe prompt lengths in tokens (comma list)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--min-f1", type=unit_interval, default=0.5, help="a probe counts when its answer F1 exceeds this")
    p.add_argument("--min-probes", type=positive_int, default=1, help="below this many answered probes, use all probes")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--quiet", action="store_true")


@command("mdkv profile-heads")
def run(args: argparse.Namespace) -> int:
    out = writable_file(args.out, "--out")
    try:
        assets.check_model_source(args.model)
    except FileNotFoundError as e:
        raise as_usage_error(e) from None
    dtype = getattr(torch, args.dtype)
    model, tok = assets.load_model(args.model, dtype=dtype, device=args.device)
    try:
        doc = profile_heads(
            model, tok, assets.haystack_text(), n_probes=args.probes, lengths=args.lengths, scoring=args.scoring,
            seed=args.seed, min_f1=args.min_f1, min_probes=args.min_probes, model_name=args.model,
            progress=not args.quiet,
        )  # fmt: skip
    except (ValueError, RuntimeError) as e:
        raise as_usage_error(e) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    flat = sorted(((v, li, h) for li, row in enumerate(doc["scores"]) for h, v in enumerate(row)), reverse=True)
    top = ", ".join(f"L{li}H{h}={v:.3f}" for v, li, h in flat[:8])
    print(f"mdkv profile-heads: {doc['meta']['success_filter']}; top heads {top} -> {out}", file=sys.stderr)
    return 0
