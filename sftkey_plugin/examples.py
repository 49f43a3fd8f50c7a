"""A small generated chain-of-thought arithmetic task in the paper's tagged format (for examples, tests and demos)."""

from __future__ import annotations

import random
from typing import Any

QUESTION = "What is {expression}?"


def arithmetic_problem(rng: random.Random, terms: int = 3, digits: int = 2) -> tuple[str, str, str]:
    """``(question, reasoning, answer)`` for a sum/difference of ``terms`` numbers worked step by step."""
    numbers = [rng.randint(1, 10**digits - 1) for _ in range(terms)]
    signs = [rng.choice("+-") for _ in range(terms - 1)]
    expression = str(numbers[0]) + "".join(f" {s} {n}" for s, n in zip(signs, numbers[1:]))
    total, steps = numbers[0], []
    for sign, number in zip(signs, numbers[1:]):
        new_total = total + number if sign == "+" else total - number
        steps.append(f"{total} {sign} {number} = {new_total}.")
        total = new_total
    return QUESTION.format(expression=expression), " ".join(steps), str(total)


def tagged_response(reasoning: str, answer: str) -> str:
    """The paper's response format."""
    return f"<Thinking>{reasoning}</Thinking>\n<Answer>{answer}</Answer>"


def arithmetic_records(n: int, seed: int = 0, form: str = "messages", **kwargs: Any) -> list[dict[str, Any]]:
    """``n`` records as ``messages``, ``prompt_completion`` (conversational), ``prompt_completion_text`` or ``text``;
    each also carries its gold ``answer``."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        question, reasoning, answer = arithmetic_problem(rng, **kwargs)
        response = tagged_response(reasoning, answer)
        if form == "messages":
            record: dict[str, Any] = {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": response},
                ]
            }
        elif form == "prompt_completion":
            record = {
                "prompt": [{"role": "user", "content": question}],
                "completion": [{"role": "assistant", "content": response}],
            }
        elif form == "prompt_completion_text":
            record = {"prompt": f"Question: {question}\nResponse: ", "completion": response}
        elif form == "text":
            record = {"text": f"Question: {question}\nResponse: {response}"}
        else:
            raise ValueError(f"Unknown form {form!r}: messages, prompt_completion, prompt_completion_text or text.")
        record["answer"] = answer
        records.append(record)
    return records
