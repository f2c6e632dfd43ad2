"""Regular expressions taken from files, at a bounded cost.

PEFT configs hold regexes — ``target_modules`` as a string, ``layers_pattern``, the keys of
``rank_pattern`` / ``alpha_pattern`` (also in diffusers' ``lora_adapter_metadata``) — and every
one of them is untrusted input: a downloaded config can hold ``(\\w+)+x``, which backtracks for
longer than the universe lasts on a module name of 30 characters. Python's ``re`` has no time
limit, so two bounds apply (``docs/robustness.md``):

1. **Refused before use**, with a message naming the file, the field and the pattern: a pattern
   that does not compile; one longer than :data:`MAX_PATTERN` characters; and the shapes whose cost
   grows exponentially with the name — a quantifier inside a repeated group (``(a+)+``), an
   alternation inside a repeated group (``(a|ab)*``), a back-reference — or polynomially with a
   high degree: more than :data:`MAX_UNBOUNDED` unbounded repeats (``.*`` …), or a repeat count
   above 1,000. Plain names (``q_proj``, ``model.layers.0.mlp``, loratools' own escaped
   ``^model\\.layers\\.0\\.q_proj``) and the regexes PEFT's documentation shows
   (``.*decoder.*(SelfAttention|EncDecAttention).*(q|k|v|o)$``) pass.
2. **A time budget** for all the matching one adapter does (:func:`time_limit`,
   :data:`BUDGET_SECONDS`): on the main thread, a SIGALRM timer interrupts a match that runs
   over it (``re`` checks for signals while it backtracks) and the adapter is refused. Other
   threads cannot take a signal; there rule 1 alone bounds the cost.

Matching follows PEFT exactly (``peft.utils.other.get_pattern_key``, ``check_target_module_exists``):
a pattern key matches a module when ``(.*\\.)?(key)$`` matches its name, the first key in dict
order winning.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import CorruptFileError
from ..jsonio import clip

try:  # the parser behind re.compile: the only way to see a pattern's structure
    from re import _constants as _sre_constants
    from re import _parser as _sre_parse
except ImportError:  # Python 3.10
    import sre_constants as _sre_constants  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["MAX_PATTERN", "MAX_UNBOUNDED", "BUDGET_SECONDS", "Pattern", "compile_pattern", "pattern_keys",
           "first_match", "time_limit"]

MAX_PATTERN = 1000  # characters; module names are rarely a tenth of that
MAX_UNBOUNDED = 4  # unbounded repeats (* + {n,}) in one pattern: the degree of the worst-case polynomial
MAX_COUNT = 1000  # the largest repeat count {n} / {n,m} accepted
BUDGET_SECONDS = 5.0  # all pattern matching for one adapter, on the main thread

_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}


class _Hazard(Exception):
    """Why a pattern's cost is unbounded, in words (never escapes this module)."""


def _walk(parsed: object, *, repeated: bool, unbounded: list[int]) -> None:
    """Raise _Hazard for the shapes rule 1 refuses; count unbounded repeats."""
    for op, av in parsed:  # type: ignore[attr-defined]
        name = str(op)
        if name in _REPEATS:
            lo, hi, sub = av
            endless = hi is _sre_constants.MAXREPEAT
            if lo > MAX_COUNT or (not endless and hi > MAX_COUNT):
                raise _Hazard(f"a repeat count above {MAX_COUNT}")
            many = endless or hi > 1
            if many and repeated:
                raise _Hazard("a quantifier inside a repeated group, e.g. (a+)+, whose matching time grows "
                              "exponentially with the name")
            if endless:
                unbounded[0] += 1
            _walk(sub, repeated=repeated or many, unbounded=unbounded)
        elif name == "SUBPATTERN":
            _walk(av[-1], repeated=repeated, unbounded=unbounded)
        elif name == "BRANCH":
            if repeated:
                raise _Hazard("an alternation inside a repeated group, e.g. (a|ab)*, whose matching time grows "
                              "exponentially with the name")
            for alternative in av[1]:
                _walk(alternative, repeated=repeated, unbounded=unbounded)
        elif name in ("GROUPREF", "GROUPREF_EXISTS"):
            raise _Hazard("a back-reference")
        elif name in ("ASSERT", "ASSERT_NOT"):
            _walk(av[1], repeated=repeated, unbounded=unbounded)
        elif name == "ATOMIC_GROUP":
            _walk(av, repeated=repeated, unbounded=unbounded)


def _refuse(where: str | Path | None, what: str, pattern: str, why: str) -> CorruptFileError:
    place = f"{where}: " if where else ""
    return CorruptFileError(
        f"{place}{what} {clip(repr(pattern))} is refused: {why}.",
        path=where,
        hint="Patterns in adapter configs are regular expressions on module names; loratools refuses those whose "
        "matching time cannot be bounded. Use the module names themselves (e.g. q_proj or model.layers.0.q_proj).",
    )


def compile_pattern(pattern: object, *, where: str | Path | None, what: str,
                    template: str = "{}", flags: int = 0) -> re.Pattern[str]:
    """``template`` with ``pattern`` in it, compiled, once ``pattern`` has passed rule 1."""
    if not isinstance(pattern, str):
        raise _refuse(where, what, str(pattern), f"it must be a string, not {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN:
        raise _refuse(where, what, pattern, f"it is {len(pattern)} characters long, more than {MAX_PATTERN}")
    try:
        parsed = _sre_parse.parse(pattern)
        compiled = re.compile(template.format(pattern), flags)
    except (re.error, RecursionError, OverflowError, ValueError, AssertionError) as e:
        raise _refuse(where, what, pattern, f"it is not a valid regular expression ({clip(str(e), 100)})") from None
    unbounded = [0]
    try:
        _walk(parsed, repeated=False, unbounded=unbounded)
    except _Hazard as e:
        raise _refuse(where, what, pattern, f"it holds {e}") from None
    except RecursionError:
        raise _refuse(where, what, pattern, "it is nested too deeply") from None
    if unbounded[0] > MAX_UNBOUNDED:
        raise _refuse(where, what, pattern, f"it holds {unbounded[0]} unbounded repeats (at most {MAX_UNBOUNDED})")
    return compiled


class Pattern:
    """One key of a PEFT pattern dict, compiled the way PEFT matches it: ``(.*\\.)?(key)$``."""

    def __init__(self, key: str, *, where: str | Path | None, what: str) -> None:
        self.key = key
        self._regex = compile_pattern(key, where=where, what=f"{what} key", template=r"(.*\.)?({})$")

    def matches(self, name: str) -> bool:
        return self._regex.match(name) is not None


def pattern_keys(keys: Sequence[str], *, where: str | Path | None, what: str) -> list[Pattern]:
    """Every key checked and compiled, in dict order (PEFT: the first that matches wins)."""
    return [Pattern(k, where=where, what=what) for k in keys]


def first_match(patterns: Sequence[Pattern], name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key whose pattern matches ``name``."""
    for p in patterns:
        if p.matches(name):
            return p.key
    return None


class _Expired(Exception):
    pass


@contextmanager
def time_limit(refusal: Callable[[], Exception], seconds: float = BUDGET_SECONDS) -> Iterator[None]:
    """Run the block with a time budget for the regex matching it does (rule 2).

    On the main thread of a platform with ``setitimer``, a SIGALRM timer interrupts the block when
    the budget is spent and ``refusal()`` is raised instead. Elsewhere, or while another timer is
    armed (the caller's own alarm is never moved), the block runs unbounded by time.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    if signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        yield
        return

    armed = [True]

    def expire(signum: int, frame: object) -> None:
        if armed[0]:
            raise _Expired()

    try:
        previous = signal.signal(signal.SIGALRM, expire)
    except ValueError:  # not the main interpreter
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        try:
            yield
        finally:
            armed[0] = False  # from here on a late alarm does nothing
    except _Expired:
        raise refusal() from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
