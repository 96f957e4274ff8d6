"""Math rewards: pull the final answer out of a completion and compare it symbolically.

The answer is, in order of preference: the last \\boxed{...} (nested braces allowed; \\fbox too),
the last GSM8K-style "#### n", or a final "the answer is ..." line. Gold answers may be bare
("72", "\\frac{14}{3}"), a GSM8K solution ending in "#### 72" or a MATH solution with a
\\boxed{} inside; they go through the same extraction. Equivalence is math-verify's (fractions,
decimals, LaTeX, percentages, thousands separators, \\text{} units), run under a time limit so a
pathological expression (a power tower, a huge factorial) cannot stall a training step.
"""
from __future__ import annotations

import re
import threading
from concurrent.futures import ProcessPoolExecutor, TimeoutError as FutureTimeout

TIMEOUT_S = 3  # per parse and per comparison; whole seconds (math-verify uses signal.alarm)

_HASHES = re.compile(r"####\s*(.+?)\s*$", re.M)
_ANSWER_IS = re.compile(r"answer\s+is\s*[:：]?\s*(.+?)\s*$", re.I | re.M)
# "18 dollars", "$1,250", "5 apples." -> the number (GSM8K-style prose units)
_NUMBER_WITH_WORDS = re.compile(r"^\\?\$?\s*(-?[\d,]*\.?\d+)\s*(?:[A-Za-z]{2,}[A-Za-z ]*)?\.?$")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} (balanced braces), or \\boxed x."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    head = text[start:].split("{", 1)[0]
    if i < 0 or head.strip() not in ("\\boxed", "\\fbox"):  # "\boxed 5" without braces
        m = re.match(r"\\(?:boxed|fbox)\s+([^\s$]+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: the completion was cut off


def extract_answer(text: str) -> str | None:
    """The final answer a completion (or gold solution) states, or None."""
    for found in (last_boxed(text), _last(_HASHES, text), _last(_ANSWER_IS, text)):
        if found is not None and found.strip():
            return _tidy(found)
    return None


def gold_answer(answer: str) -> str:
    """A dataset's answer field as a bare answer ("#### 72" -> "72", a MATH solution -> its box)."""
    found = last_boxed(answer)
    if found is None:
        found = _last(_HASHES, answer)
    return _tidy(found if found is not None else answer)


def math_reward(completion: str, answer: str, *, timeout: int = TIMEOUT_S) -> float:
    """1.0 when the completion's final answer equals the gold `answer`, else 0.0."""
    pred = extract_answer(completion)
    if pred is None:
        return 0.0
    gold = gold_answer(answer)
    if pred == gold:
        return 1.0
    return 1.0 if _equivalent(gold, pred, timeout) else 0.0


_CHECKED = False  # set once the checker has passed its self-check in this process


def check_math_verify() -> None:
    """A UserError, when a math task is built, if math-verify cannot run: otherwise every
    equivalent-but-not-identical answer would score 0 without a word. Checks that 1/2 and
    0.5 are found equal (identical strings never reach math-verify)."""
    global _CHECKED
    if _CHECKED:
        return
    from ..errors import UserError
    fix = "reinstall it: pip install --force-reinstall 'math-verify[antlr4_13_2]'"
    try:
        works = _equivalent("\\frac{1}{2}", "0.5", TIMEOUT_S)
    except Exception as e:  # ImportError, a broken parser dependency
        text = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"the math answer checker (math-verify) cannot run "
                        f"({type(e).__name__}: {text[:200]}); {fix}") from None
    if not works:
        raise UserError(f"the math answer checker (math-verify) runs but finds \\frac{{1}}{{2}} "
                        f"and 0.5 different; {fix}")
    _CHECKED = True


def has_answer_format(completion: str) -> bool:
    """Whether the completion states a final answer in a form we can extract (format bonus)."""
    return extract_answer(completion) is not None


def _last(pattern: re.Pattern, text: str) -> str | None:
    found = pattern.findall(text)
    return found[-1] if found else None


def _tidy(answer: str) -> str:
    answer = answer.strip().rstrip(" .$").lstrip(" $")
    m = _NUMBER_WITH_WORDS.match(answer)
    return m.group(1) if m else answer


def _equivalent(gold: str, pred: str, timeout: int) -> bool:
    if len(gold) > 1000 or len(pred) > 1000:  # not an answer; refuse to hand it to sympy
        return False
    if threading.current_thread() is threading.main_thread():
        return _verify(gold, pred, timeout)
    return _verify_elsewhere(gold, pred, timeout)


def _verify(gold: str, pred: str, timeout: int) -> bool:
    """math-verify with its own (signal.alarm) time limit; main thread only."""
    from math_verify import parse, verify
    try:
        g = parse("\\boxed{" + gold + "}", parsing_timeout=timeout)
        p = parse("\\boxed{" + pred + "}", parsing_timeout=timeout)
        return bool(g and p and verify(g, p, timeout_seconds=timeout))
    except Exception:  # math-verify raises on timeouts and unparseable input
        return False


# signal.alarm works only in the main thread. A reward computed in a thread pool goes to a
# one-process pool instead, whose worker is killed and replaced when a check overruns.
_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _verify_elsewhere(gold: str, pred: str, timeout: int) -> bool:
    global _pool
    with _pool_lock:
        if _pool is None:
            import multiprocessing
            _pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool = _pool
    future = pool.submit(_verify, gold, pred, timeout)
    try:
        return future.result(timeout=3 * timeout + 30)  # generous: the first call imports sympy
    except FutureTimeout:
        with _pool_lock:
            if _pool is pool:
                _pool = None
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        return False
