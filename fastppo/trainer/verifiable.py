"""Built-in verifiable rewards, chosen by name with ``--reward``: ``math``, ``exact`` and ``format``.

Each scores a response 1.0 or 0.0:

- ``math``: the response's final answer (its last ``\\boxed{…}``, else what follows GSM8K's
  ``####``, else its last number) equals the row's ``answer`` column (a plain number or string, a
  ``\\boxed{…}`` answer, or a GSM8K solution ending in ``#### 42``). Numbers compare by value
  (``1,234`` == ``1234``, ``0.5`` == ``1/2`` == ``\\frac{1}{2}``, to 1e-6 relative); anything else
  as normalised text. With ``math-verify`` installed (``pip install fastppo[math]``) an answer that
  math-verify finds equivalent (symbolic expressions, sets, intervals) is correct too.
- ``exact``: the response equals ``answer`` after ``normalise_text`` (strip, case-fold, whitespace
  collapsed, a trailing period dropped).
- ``format``: the whole response matches ``--format_regex`` (``re.fullmatch``, DOTALL).

An empty response, or one without an answer, scores 0. A row whose ``answer`` is missing (None)
gives None: scored 0 and counted in ``reward_invalid``.
"""

import importlib.util
import re
import threading
from collections.abc import Callable
from fractions import Fraction

#: Relative tolerance of a numeric match (decimals against fractions: 0.333333 vs 1/3 is not one).
TOLERANCE = 1e-6

_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$")
_FRACTION = re.compile(r"^(-?)\(?(-?\d+)\)?/\(?(-?\d+)\)?$")
#: A number in running text: a minus sign only where it cannot be a subtraction ("5-3" is 5, 3).
_NUMBER_IN_TEXT = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<!\d)\.\d+")


def math_verify_available() -> bool:
    """Whether ``math_verify`` (the ``fastppo[math]`` extra) is importable."""
    return importlib.util.find_spec("math_verify") is not None


# --------------------------------------------------------------------------------------------
# Finding the answer.


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` (or ``\\fbox{…}``) of ``text``, nested braces kept;
    ``\\boxed 5`` gives ``5``; None when there is none or its braces never close."""
    found = list(re.finditer(r"\\(?:boxed|fbox)", text))
    if not found:
        return None
    rest = text[found[-1].end() :]
    if not rest.lstrip().startswith("{"):  # \boxed 5
        word = rest.split() if rest.startswith(" ") else []
        return word[0].rstrip("$.") or None if word else None
    rest = rest.lstrip()
    depth = 0
    for i, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:i].strip()
    return None


def after_hashes(text: str) -> str | None:
    """What follows GSM8K's last ``####`` (to the end of its line), or None."""
    if "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].strip().splitlines()
    return answer[0].strip() if answer else None


def last_number(text: str) -> str | None:
    """The last number written in ``text`` ("-3", "1,234", "2.5", "3/4"), or None."""
    found = _NUMBER_IN_TEXT.findall(text)
    return found[-1] if found else None


def extract_answer(response: str) -> str | None:
    """A response's final answer: its last ``\\boxed{…}``, else what follows ``####``, else its last
    number; None when it has none."""
    for find in (last_boxed, after_hashes, last_number):
        answer = find(response)
        if answer:
            return answer
    return None


def reference_answer(answer) -> str | None:
    """The row's ``answer`` column as the text to match: a number as written, a ``\\boxed{…}``'s
    content, a GSM8K solution's part after ``####``, or the stripped text; None when missing."""
    if answer is None:
        return None
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return repr(answer)
    text = str(answer).strip()
    return last_boxed(text) or after_hashes(text) or text


# --------------------------------------------------------------------------------------------
# Comparing answers.


def normalise_latex(text: str) -> str:
    """``text`` without what does not change a math answer: $ signs, \\text{} wrappers, spacing
    commands, \\left/\\right, degrees and percent signs, spaces and a trailing period;
    ``\\frac{a}{b}`` (``\\dfrac``, ``\\tfrac``, ``\\frac12``) becomes ``(a)/(b)``."""
    s = text.strip().strip("$")
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|displaystyle|[!,;: ])", "", s)
    s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\[dt]?frac(\d)(\d)", r"\1/\2", s)
    s = re.sub(r"\^\{?\\circ\}?|\\%|%", "", s)
    return re.sub(r"\s+", "", s).rstrip(".")


def to_number(text: str) -> Fraction | None:
    """The exact value of a number written as ``text`` (after ``normalise_latex``): "-1,234",
    "2.50", ".5", "3/4", "(-1)/(2)"; None when it is not one."""
    s = normalise_latex(text)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if _DECIMAL.match(s):
        return Fraction(s.rstrip(".") if s.endswith(".") else s)
    fraction = _FRACTION.match(s)
    if fraction and int(fraction.group(3)) != 0:
        sign = -1 if fraction.group(1) else 1
        return sign * Fraction(int(fraction.group(2)), int(fraction.group(3)))
    return None


def numbers_equal(a: Fraction, b: Fraction) -> bool:
    return abs(a - b) <= TOLERANCE * max(1, abs(b))


def answers_match(predicted: str, reference: str) -> bool:
    """The normalised numeric and string match: equal numbers (``to_number``, to ``TOLERANCE``), or
    equal text after ``normalise_latex`` and case-folding. A predicted answer that is not a number
    (``\\boxed{42 \\text{ apples}}``) is read by its last number when the reference is one."""
    gold = to_number(reference)
    if gold is not None:
        value = to_number(predicted)
        if value is None and (number := last_number(normalise_latex(predicted))) is not None:
            value = to_number(number)
        return value is not None and numbers_equal(value, gold)
    return normalise_latex(predicted).casefold() == normalise_latex(reference).casefold()


def math_verify_match(predicted: str, reference: str) -> bool:
    """math-verify's verdict on the two answers (each parsed as LaTeX inside ``\\boxed{}``); False
    when either does not parse. Its timeouts (5 s) use SIGALRM, which only the main thread may set:
    none in other threads."""
    from math_verify import parse, verify

    limit = 5 if threading.current_thread() is threading.main_thread() else None

    def parsed(answer: str):
        plain = answer.replace(",", "") if _THOUSANDS.match(normalise_latex(answer)) else answer
        return parse(f"\\boxed{{{plain}}}", parsing_timeout=limit)

    try:
        gold, value = parsed(reference), parsed(predicted)
        return bool(gold and value and verify(gold, value, timeout_seconds=limit))
    except Exception:  # a parser's failure on odd text is a wrong answer, not a crashed run
        return False


def math_correct(response: str, answer, *, use_math_verify: bool | None = None) -> float | None:
    """1.0 when ``response``'s final answer (``extract_answer``) equals ``answer`` (the row's
    column, see ``reference_answer``), else 0.0; None when ``answer`` is missing.
    ``use_math_verify``: None uses it when it is installed."""
    reference = reference_answer(answer)
    if reference is None:
        return None
    predicted = extract_answer(response or "")
    if not predicted:
        return 0.0
    if answers_match(predicted, reference):
        return 1.0
    if use_math_verify is None:
        use_math_verify = math_verify_available()
    return float(use_math_verify and math_verify_match(predicted, reference))


# --------------------------------------------------------------------------------------------
# The reward functions, as --reward calls them (rewards.Reward: the columns they name).


def math_reward(prompts: list[str], completions: list[str], answer: list) -> list[float | None]:
    """``--reward math``: (B,) 1.0 for each response whose final answer equals its row's ``answer``."""
    return [math_correct(c, a) for c, a in zip(completions, answer, strict=True)]


def normalise_text(text: str) -> str:
    """Stripped, case-folded, whitespace runs as one space, a trailing period dropped."""
    return re.sub(r"\s+", " ", str(text)).strip().casefold().removesuffix(".").rstrip()


def exact_reward(prompts: list[str], completions: list[str], answer: list) -> list[float | None]:
    """``--reward exact``: (B,) 1.0 for each response equal to its row's ``answer`` (``normalise_text``
    on both); None where the row has no answer."""
    return [
        None if a is None else float(normalise_text(c) == normalise_text(a))
        for c, a in zip(completions, answer, strict=True)
    ]


def format_reward(pattern: str) -> Callable[[list[str], list[str]], list[float]]:
    """``--reward format``: a function of (prompts, completions) giving (B,) 1.0 for each response
    that ``pattern`` matches whole (``re.fullmatch``, DOTALL)."""
    regex = re.compile(pattern, re.DOTALL)

    def format_match(prompts: list[str], completions: list[str]) -> list[float]:
        return [float(regex.fullmatch(c) is not None) for c in completions]

    return format_match
