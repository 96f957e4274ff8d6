"""math_reward on answers written the way the datasets write them.

Gold formats: GSM8K "answer" (worked solution, calculator annotations, "#### n"); MATH
"solution" (prose with \\boxed{}); MATH-500 / DeepScaleR "answer" (bare LaTeX); NuminaMath-CoT
"solution" (prose, usually ending in $\\boxed{...}$).
"""
import threading
import time

import pytest

from onelayer.tasks.math import extract_answer, gold_answer, last_boxed, math_reward

GSM8K_72 = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
            "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
GSM8K_10 = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"
GSM8K_1000 = "The total is 250 * 4 = <<250*4=1000>>1000 dollars.\n#### 1000"
GSM8K_NEG = "The temperature fell 3 + 2 = <<3+2=5>>5 degrees below zero.\n#### -5"
MATH_14_3 = ("Substituting, $3x = 14$, so $x = \\boxed{\\frac{14}{3}}$.")
MATH_POLAR = ("We have $r = \\sqrt{0^2 + 3^2} = 3.$ ... Therefore, the polar coordinates are "
              "$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$")
MATH_NESTED = "Hence the sum is $\\boxed{\\frac{\\sqrt{3}}{2} + \\frac{1}{2}}$."
NUMINA = ("1. Let the number be $n$.\n2. Then $2n + 3 = 11$, so $n = 4$.\n\n"
          "Conclusion: $\\boxed{4}$")
NUMINA_CHOICE = "Checking each option, only (C) holds.\n\n$\\boxed{\\text{C}}$"

CASES = [
    # --- GSM8K gold (#### n) -----------------------------------------------------------
    ("She sold 72 clips in total.\n#### 72", GSM8K_72, 1.0),
    ("So the answer is $\\boxed{72}$.", GSM8K_72, 1.0),
    ("The answer is 72.", GSM8K_72, 1.0),
    ("The answer is: 72", GSM8K_72, 1.0),
    ("Total: \\boxed{72.0}", GSM8K_72, 1.0),
    ("\\boxed{71}", GSM8K_72, 0.0),
    ("She sold 72 clips.", GSM8K_72, 0.0),  # no final-answer marker: nothing to grade
    ("#### 24\nWait, adding May: #### 72", GSM8K_72, 1.0),  # the last marker counts
    ("#### 72\nActually it is #### 24", GSM8K_72, 0.0),
    ("She earned $\\boxed{\\$10}$.", GSM8K_10, 1.0),
    ("The answer is $10.", GSM8K_10, 1.0),
    ("The answer is 10 dollars.", GSM8K_10, 1.0),
    ("#### 10.00", GSM8K_10, 1.0),
    ("\\boxed{10.5}", GSM8K_10, 0.0),
    ("\\boxed{1,000}", GSM8K_1000, 1.0),
    ("The answer is 1,000 dollars.", GSM8K_1000, 1.0),
    ("\\boxed{1000}", GSM8K_1000, 1.0),
    ("\\boxed{100}", GSM8K_1000, 0.0),
    ("\\boxed{-5}", GSM8K_NEG, 1.0),
    ("\\boxed{5}", GSM8K_NEG, 0.0),
    ("The answer is -5.", GSM8K_NEG, 1.0),
    # --- MATH solutions (gold is the boxed part of a solution) ---------------------------
    ("So $x = \\boxed{\\frac{14}{3}}$.", MATH_14_3, 1.0),
    ("\\boxed{\\dfrac{14}{3}}", MATH_14_3, 1.0),
    ("\\boxed{14/3}", MATH_14_3, 1.0),
    ("\\boxed{4\\frac{2}{3}}", MATH_14_3, 1.0),  # a mixed number, as MATH writes them
    ("\\boxed{4.67}", MATH_14_3, 0.0),
    ("\\boxed{\\frac{3}{14}}", MATH_14_3, 0.0),
    ("\\boxed{(3, \\frac{\\pi}{2})}", MATH_POLAR, 1.0),
    ("\\boxed{\\left(3,\\frac{\\pi}{2}\\right)}", MATH_POLAR, 1.0),
    ("\\boxed{(3, \\pi)}", MATH_POLAR, 0.0),
    ("\\boxed{\\frac{1 + \\sqrt{3}}{2}}", MATH_NESTED, 1.0),
    ("\\boxed{\\frac{1}{2} + \\frac{\\sqrt{3}}{2}}", MATH_NESTED, 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", MATH_NESTED, 0.0),
    # --- MATH-500 / DeepScaleR bare answers --------------------------------------------------
    ("\\boxed{p - q}", "p - q", 1.0),
    ("\\boxed{-q + p}", "p - q", 1.0),
    ("\\boxed{q - p}", "p - q", 0.0),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", 1.0),
    ("\\boxed{90^\\circ}", "90^\\circ", 1.0),
    ("\\boxed{90}", "90^\\circ", 1.0),
    ("\\boxed{3\\sqrt{13}}", "3\\sqrt{13}", 1.0),
    ("\\boxed{\\sqrt{117}}", "3\\sqrt{13}", 1.0),
    ("\\boxed{\\sqrt{113}}", "3\\sqrt{13}", 0.0),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", 1.0),
    ("\\boxed{C}", "\\text{(C)}", 1.0),
    ("\\boxed{D}", "\\text{(C)}", 0.0),
    ("\\boxed{[-2, 7]}", "[-2,7]", 1.0),
    ("\\boxed{(-2, 7)}", "[-2,7]", 0.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{50\\%}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{2}{3}}", "\\frac23", 1.0),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),
    ("\\boxed{x^2 + 2x}", "(x+1)^2", 0.0),
    ("\\boxed{10\\text{ cm}}", "10", 1.0),
    ("\\boxed{2, 3}", "3, 2", 1.0),
    ("\\boxed{\\infty}", "\\infty", 1.0),
    ("The final answer is $\\frac{2}{3}$.", "\\frac{2}{3}", 1.0),
    ("\\boxed{23}", "23", 1.0),
    ("\\boxed{-1}", "-1", 1.0),
    ("\\boxed{1}", "-1", 0.0),
    # --- NuminaMath-CoT solutions -------------------------------------------------------------
    ("Thus $n=\\boxed{4}$.", NUMINA, 1.0),
    ("\\boxed{n = 4}", NUMINA, 1.0),
    ("\\boxed{5}", NUMINA, 0.0),
    ("\\boxed{C}", NUMINA_CHOICE, 1.0),
    ("\\boxed{\\textbf{(C)}}", NUMINA_CHOICE, 1.0),
    ("\\boxed{B}", NUMINA_CHOICE, 0.0),
    # --- extraction edge cases --------------------------------------------------------------
    ("First guess \\boxed{3}, then corrected: \\boxed{4}", "4", 1.0),
    ("First guess \\boxed{4}, then corrected: \\boxed{3}", "4", 0.0),
    ("\\fbox{4}", "4", 1.0),
    ("\\boxed 4", "4", 1.0),
    ("The answer is \\boxed{\\frac{1}{", "\\frac{1}{2}", 0.0),  # cut off mid-answer
    ("", "4", 0.0),
    ("\\boxed{}", "4", 0.0),
]


def test_table_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("completion,gold,expected", CASES)
def test_math_reward(completion, gold, expected):
    assert math_reward(completion, gold) == expected


def test_extraction_pieces():
    assert last_boxed("a \\boxed{\\frac{a}{b^{2}}} b") == "\\frac{a}{b^{2}}"
    assert last_boxed("no box") is None
    assert gold_answer(GSM8K_72) == "72"
    assert gold_answer(MATH_POLAR) == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert gold_answer("\\frac{14}{3}") == "\\frac{14}{3}"
    assert extract_answer("The answer is $\\frac{1}{2}$.") == "\\frac{1}{2}"
    assert extract_answer("no final answer here") is None


def test_pathological_expression_is_cut_off():
    start = time.monotonic()
    assert math_reward("\\boxed{9^{9^{9^{9}}}}", "1", timeout=1) == 0.0
    assert time.monotonic() - start < 8


def test_reward_from_a_worker_thread():
    """signal-based time limits need the main thread; threads use a helper process."""
    results = {}

    def score():
        results["right"] = math_reward("\\boxed{\\frac{14}{3}}", MATH_14_3)
        results["wrong"] = math_reward("\\boxed{5}", MATH_14_3)

    worker = threading.Thread(target=score)
    worker.start()
    worker.join(timeout=120)
    assert results == {"right": 1.0, "wrong": 0.0}
