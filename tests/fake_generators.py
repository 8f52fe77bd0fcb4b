"""Generators for ``grouprl eval --generator tests.fake_generators:FACTORY`` (see grouprl/evaluate.py).

They ignore the model and write completions whose correctness the tests know in advance.
"""


def first_problem_first_sample(model, settings):
    """Problem 0, sample 0: the reference answer in a box (inside <answer> tags); every other
    sample: a wrong boxed answer, except sample 1 of problem 0, which has no final answer at all."""

    def generate(examples, n):
        out = []
        for i, ex in enumerate(examples):
            samples = []
            for k in range(n):
                if i == 0 and k == 0:
                    samples.append(f"<think>\nworking\n</think>\n<answer>\\boxed{{{ex['solution']}}}</answer>")
                elif i == 0 and k == 1:
                    samples.append("I could not finish")
                else:
                    samples.append("\\boxed{-123456}")
            out.append(samples)
        return out

    return generate


def always_right(model, settings):
    """Every sample ends with the answer line the lighteval maths prompt asks for, holding the reference.

    (A bare ``Answer: \\left( 3, \\frac{\\pi}{2} \\right)`` without ``$`` is not read as LaTeX by
    lighteval, so an oracle must use the requested format.)"""
    return lambda examples, n: [
        [f"Some steps.\nTherefore, the final answer is: $\\boxed{{{ex['solution']}}}$. I hope it is correct."] * n
        for ex in examples]


def unboxed_final_answer(model, settings):
    """Sample 0: 'the final answer is: $<reference>$.' with no box (lighteval reads it); sample 1: a
    completion cut mid-sentence whose last number is the reference (lighteval's last-number fallback)."""

    def generate(examples, n):
        texts = ["Counting again, the final answer is: ${}$.", "Trying 3, then 12, and finally {}"]
        return [[texts[k % 2].format(ex["solution"]) for k in range(n)] for ex in examples]

    return generate
