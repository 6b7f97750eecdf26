"""Source labels of the store's evaluations: every label any module writes or reads, in one place.

A label says why an evaluation was made (``evaluations.source`` and the ``labels`` table of
:class:`~attnprune.store.Store`). The search's own evaluations are on the validation split;
``confirm*`` labels on its confirmation half; ``test:*`` and ``paired:*`` on the TEST split.
"""

from __future__ import annotations

SAMPLE = "sample"  # the design's random masks and the unrepaired model
KNOCKOUT = "knockout"  # single-head knockouts (shared by every knockout method of a run)
# AP's single-head knockouts measured for the bias only (--knockout-ppl below 1), under the
# validation evaluator's bias-only setting: not shared, since other methods need their perplexity
KNOCKOUT_BIAS = "knockout-bias"
CONFIRM_UNREPAIRED = "confirm:unrepaired"  # the unrepaired model on the confirmation data
DESIGN = frozenset({SAMPLE, KNOCKOUT, KNOCKOUT_BIAS})  # what a store may hold before any search result
# the guard on StereoSet's language-modelling score (every other guard is a HolisticBias axis)
LMS_GUARD = "lms"
# every other HolisticBias axis whose unrepaired bias clears its noise floor, and lms
AUTO_GUARD = "auto"


CANDIDATE = "candidate-r"  # the stem of every round's label


def candidates(round_: int, prefix: str = "") -> str:
    """AP's validated candidates of round ``round_`` (a variant's labels carry its ``prefix``)."""
    return f"{prefix}{CANDIDATE}{round_}"


def is_candidate(source: str) -> bool:
    """Whether ``source`` labels masks the search proposed (any round, any variant), not the design's."""
    return CANDIDATE in source


def stage(source: str) -> str:
    """What part of a method's work a validation evaluation labelled ``source`` was (for cost tables)."""
    kind = source.rsplit(":", 1)[-1] if not source.startswith(("method:", "confirm:")) else source.split(":", 1)[0]
    if kind in (KNOCKOUT, KNOCKOUT_BIAS):
        return "knockouts"
    if kind == SAMPLE:
        return "samples"
    if CANDIDATE in kind or kind == "method":
        return "candidates"
    if kind == "confirm":
        return "confirmations"
    return kind


def method(name: str) -> str:
    """The validation evaluations of a method without stages of its own."""
    return f"method:{name}"


def confirm(name: str) -> str:
    """``name``'s candidates on the confirmation data."""
    return f"confirm:{name}"


def guard(axis: str) -> str:
    """A guarded axis's evaluations on its validation prompts (both halves: nothing else reads them)."""
    return f"guard:{axis}"


def test(name: str) -> str:
    """TEST-split evaluations of the comparison ``name``."""
    return f"test:{name}"


def paired(a: str, b: str) -> str:
    """The TEST-split comparison of method ``a`` minus method ``b`` on the same prompts."""
    return f"paired:{a}-{b}"
