"""An LLM judge that scores an answer 0-5 against the reference, with the StableLLaVA rubric.

StableLLaVA (v2 §5.2 and Appendix D, Figure 9) asks GPT-4 to score each predicted answer against the
annotated reference on six levels, 0 (no relevance) to 5 (aligns without deviation), and reports the
mean score per test set. The rubric below is the paper's Figure 9 text (its preamble says "a score of 1
signifies entirely different", which contradicts its own 0-point level; we say 0). The reply is
structured output validated with `JudgeVerdict`; a request that still fails after the client's one
repair turn leaves the item unscored and counted as `judge_failed`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from synthvlm.llm import LLMRequest, LLMResult

log = logging.getLogger(__name__)

JUDGE_SYSTEM_PROMPT = """\
As an AI visual assistant, your ability is evaluating predicted answer based on the given question and \
correct answer. Now I have a predicted answer and corresponding question, and I need to compare predicted \
answer with the correct answer. Here's a scoring standard you can use to assess. A score of 5 indicates \
that the response perfectly aligns with the answer, while a score of 0 signifies that the response is \
entirely different from the answer.

Scoring Key (5-0 Point Scale)

Exact Correlation (5 points)
The predicted answer strictly replicates the reference answer.
It accurately perceives and elaborates on the queried element.

Almost Exact Correlation (4 points)
The predicted answer is not verbatim but delivers a notion akin to the reference answer.
Slight variations in phraseology exist, but the core idea remains consistent.
May neglect a minor item, but this does not incite confusion or misinterpretation.

Moderately Accurate (3 points)
The predicted answer captures the chief matter but may omit key details.
It could contain data or semantics that may be misleading.
Understands the key intent but lacks exactness.

Somewhat Accurate (2 points)
The predicted answer is loosely related to the reference answer with conspicuous discrepancies.
It correctly portrays a segment of the required details but bypasses or distorts major aspects.
Significant corrections are necessary to match this response with the reference answer.

Barely Related (1 point)
The predicted answer barely links to the actual object or query.
Mostly incorrect or misleading, exhibiting trivial understanding.
A viewer or user would be predominantly misguided based on this response.

Completely Inaccurate (0 points)
The predicted answer shares no relevance to the reference answer.
Utterly misinterprets or overlooks the queried item.
No discernible cognition of the assessment subject is evident.

Reply with a JSON object with two fields: "reason" (one or two sentences) and "score" (an integer from \
0 to 5)."""

# The user message; the fake test server parses these labels, so keep them in sync with its tests.
QUESTION_LABEL = "Question: "
REFERENCE_LABEL = "Reference answer: "
PREDICTION_LABEL = "Predicted answer: "


class ChatRunner(Protocol):
    """What the judge needs from an LLM client: `synthvlm.llm.LLMClient` (or any object with run_many)."""

    def run_many(self, requests: Iterable[LLMRequest]) -> list[LLMResult]: ...


class JudgeVerdict(BaseModel):
    """The judge's structured reply. `reason` comes first so the model explains before it scores."""

    model_config = ConfigDict(extra="forbid")

    reason: str
    score: int = Field(ge=0, le=5)


@dataclass(frozen=True)
class JudgeTask:
    """One answer to score."""

    id: str
    question: str
    references: Sequence[str]
    prediction: str


@dataclass(frozen=True)
class JudgeOutcome:
    """A score 0-5 with its reason, or score None and why the judge gave none."""

    id: str
    score: int | None
    reason: str

    @property
    def ok(self) -> bool:
        return self.score is not None


def judge_prompt(task: JudgeTask) -> str:
    reference = " / ".join(task.references)
    return (
        f"{QUESTION_LABEL}{task.question.strip()}\n"
        f"{REFERENCE_LABEL}{reference.strip()}\n"
        f"{PREDICTION_LABEL}{task.prediction.strip()}"
    )


def judge_request(task: JudgeTask) -> LLMRequest:
    return LLMRequest.from_prompt(
        task.id, judge_prompt(task), system=JUDGE_SYSTEM_PROMPT, schema=JudgeVerdict
    )


def run_judge(client: ChatRunner, tasks: Sequence[JudgeTask]) -> list[JudgeOutcome]:
    """Score every task (in input order); rejected requests come back with score None and the reason."""
    results = client.run_many(judge_request(task) for task in tasks)
    outcomes = []
    for task, result in zip(tasks, results, strict=True):
        if result.ok and isinstance(result.parsed, JudgeVerdict):
            outcomes.append(JudgeOutcome(task.id, result.parsed.score, result.parsed.reason))
        else:
            reason = f"judge failed ({result.reject_kind}): {result.reason}"
            log.warning("judge: no score for %s: %s", task.id, reason)
            outcomes.append(JudgeOutcome(task.id, None, reason))
    return outcomes
