"""Offline generators for every StableLLaVA LLM task, for the "template" backend (no model, no network).

They make the whole StableLLaVA path run deterministically in tests and the demo: keywords come from the
ability's seed bank, prompts are built from the data file's `template` (subject pattern + scene + style),
and dialogues are fixed sentence patterns about the double-bracketed keyword. They read a request's
parameters from its '#Input' block (prompts.read_input), just as a person reading the request would.
This is not LLM output: the template backend marks every result and the stages copy its
`describe()` ({"backend": "template", "model": "template"}) into record and dialogue provenance.

Importing this module registers one generator per task (synthvlm.llm.template_backend.register_template).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from synthvlm.llm import LLMRequest
from synthvlm.llm.template_backend import (
    register_template,
    request_key,
    request_text,
    stable_choice,
    stable_int,
)
from synthvlm.stablellava.abilities import Ability, load_registry
from synthvlm.stablellava.dialogues import TASKS
from synthvlm.stablellava.emphasis import contains_phrase, normalize, parse_prompt
from synthvlm.stablellava.filters import words_found
from synthvlm.stablellava.interleaved import CLOSE, OPEN, TASK_INTERLEAVED
from synthvlm.stablellava.keywords import TASK_KEYWORDS
from synthvlm.stablellava.prompts import TASK_PAIR, TASK_PROMPT, read_input

STYLES: tuple[str, ...] = ("photorealistic", "realistic", "highly detailed", "soft light", "natural light")
QUALITY: tuple[str, ...] = ("8k", "4k", "high resolution", "sharp focus")


def _fields(request: LLMRequest) -> dict[str, str]:
    return read_input(request_text(request))


def _ability(fields: dict[str, str]) -> Ability:
    name = fields.get("ability", "")
    registry = load_registry()
    if name not in registry:
        raise ValueError(f"unknown ability {name!r} in the request's #Input block")
    return registry[name]


def _list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def compose_prompt(ability: Ability, keyword: str, key: tuple[object, ...], scene: str | None = None) -> str:
    """A prompt from the ability's template: "((pattern with keyword)), scene, style, quality"."""
    bank = ability.template
    subject = stable_choice(bank.subjects, *key, "subject") if bank.subjects else ""
    head = " ".join(bank.subject_pattern.format(keyword=keyword, subject=subject).split())
    head = head.replace("(( ", "((").replace(" ))", "))")
    styles = [s for s in STYLES if not words_found(s, ability.restrictions.forbidden)] or ["detailed"]
    parts = [
        head,
        scene or stable_choice(bank.scenes, *key, "scene"),
        stable_choice(styles, *key, "style"),
        stable_choice(QUALITY, *key, "quality"),
    ]
    return ", ".join(parts)


def keywords_reply(request: LLMRequest) -> str:
    fields = _fields(request)
    bank = _ability(fields).keyword_bank
    count = min(int(fields.get("count", "10")), len(bank))
    start = stable_int(*request_key(request)) % len(bank)
    return json.dumps({"keywords": (bank[start:] + bank[:start])[:count]})


def sd_prompt_reply(request: LLMRequest) -> str:
    fields = _fields(request)
    ability = _ability(fields)
    keyword = stable_choice(_list(fields["keywords"]), *request_key(request), "keyword")
    return json.dumps({"prompt": compose_prompt(ability, keyword, request_key(request))})


def pair_reply(request: LLMRequest) -> str:
    """similarity: one keyword in two scenes; difference: two keywords in one scene; logical: before/after."""
    fields = _fields(request)
    ability = _ability(fields)
    key = request_key(request)
    keywords = _list(fields["keywords"])
    first = stable_choice(keywords, *key, "first")
    others = [k for k in keywords if k != first] or [first]
    scene = stable_choice(ability.template.scenes, *key, "scene")
    relation = fields.get("relation", "similarity")
    if relation == "difference":
        second, scene_2 = stable_choice(others, *key, "second"), scene
    elif relation == "logical":
        second, scene_2 = first, f"{scene} after heavy rain"
    else:
        second = first
        scenes = [s for s in ability.template.scenes if s != scene] or [scene]
        scene_2 = stable_choice(scenes, *key, "scene 2")
    return json.dumps(
        {
            "prompt_1": compose_prompt(ability, first, (*key, 1), scene),
            "prompt_2": compose_prompt(ability, second, (*key, 1), scene_2),
        }
    )


def _subject(prompt: str) -> str:
    parsed = parse_prompt(prompt)
    return (parsed.emphasized or parsed.keywords or ("the scene",))[0]


def _bank_keyword(ability: Ability, subject: str) -> str | None:
    """The longest bank keyword inside `subject` (the ability keyword the prompt was built from)."""
    found = [k for k in ability.keyword_bank if contains_phrase(subject, k)]
    return max(found, key=len) if found else None


def _distractor(ability: Ability, subject: str, key: tuple[object, ...]) -> str:
    """`subject` with its bank keyword swapped for another one ('crimson umbrella' -> 'teal umbrella')."""
    own = _bank_keyword(ability, subject)
    others = [k for k in ability.keyword_bank if normalize(k) != normalize(own or "")]
    other = stable_choice(others, *key, "distractor")
    if own is None:
        return other
    start = normalize(subject).find(normalize(own))
    return normalize(subject)[:start] + other + normalize(subject)[start + len(own) :]


def _question_answer(
    ability: Ability, subject: str, question_type: str, key: tuple[object, ...]
) -> tuple[str, str, list[str]]:
    """(question, answer, answer keywords) of one template question about `subject`."""
    distractor = _distractor(ability, subject, key)
    if question_type == "yes_no":
        if stable_int(*key, "polarity") % 2:
            return f"Does the image show {subject}?", f"Yes, the image shows {subject}.", ["yes"]
        return f"Does the image show {distractor}?", f"No, it shows {subject}, not {distractor}.", ["no"]
    answer_keywords = [_bank_keyword(ability, subject) or subject]
    if question_type == "either_or":
        a, b = (subject, distractor) if stable_int(*key, "order") % 2 else (distractor, subject)
        return f"Does the image show {a} or {b}?", f"It shows {subject}.", answer_keywords
    return f"Which {ability.noun} is shown in the image?", f"The image shows {subject}.", answer_keywords


def caption_reply(request: LLMRequest) -> str:
    parsed = parse_prompt(_fields(request)["prompt"])
    rest = f", {', '.join(parsed.keywords[1:3])}" if len(parsed.keywords) > 1 else ""
    return json.dumps({"description": f"A picture of {_subject(parsed.raw)}{rest}."})


def qa_reply(request: LLMRequest) -> str:
    fields = _fields(request)
    question, answer, _ = _question_answer(
        _ability(fields), _subject(fields["prompt"]), fields.get("question_type", "wh"), request_key(request)
    )
    return json.dumps({"question": question, "answer": answer})


def multi_turn_reply(request: LLMRequest) -> str:
    fields = _fields(request)
    ability, subject, key = _ability(fields), _subject(fields["prompt"]), request_key(request)
    turns = []
    for index, qtype in enumerate(("wh", "yes_no", "either_or")):
        question, answer, _ = _question_answer(ability, subject, qtype, (*key, index))
        turns.append({"question": question, "answer": answer})
    turns.append(
        {"question": "Can you describe the image briefly?", "answer": f"It is a picture of {subject}."}
    )
    count = max(1, int(fields.get("turns", "3")))
    return json.dumps({"turns": turns[:count]})


def multi_image_reply(request: LLMRequest) -> str:
    fields = _fields(request)
    first, second = _subject(fields["prompt_1"]), _subject(fields["prompt_2"])
    captions = {
        "similarity": f"Both images show a similar subject: the first shows {first}, the second {second}.",
        "difference": f"The first image shows {first}, while the second image shows {second}.",
        "logical": f"The first image shows {first}; the second shows {second} later, after heavy rain.",
    }
    return json.dumps({"caption": captions.get(fields.get("relation", ""), captions["similarity"])})


def eval_reply(request: LLMRequest) -> str:
    """The reply schema of the question type: keywords (wh), yes/no, or the two options (either-or)."""
    fields = _fields(request)
    ability, subject, key = _ability(fields), _subject(fields["prompt"]), request_key(request)
    question_type = fields.get("question_type", "wh")
    question, answer, keywords = _question_answer(ability, subject, question_type, key)
    reply: dict[str, object] = {"question": question, "answer": answer}
    if question_type == "yes_no":
        reply["yes_or_no"] = keywords[0]
    elif question_type == "either_or":
        distractor = _distractor(ability, subject, key)
        a, b = (subject, distractor) if stable_int(*key, "order") % 2 else (distractor, subject)
        reply.update(options=[a, b], correct_option=subject)
    else:
        reply["answer_keywords"] = keywords
    return json.dumps(reply)


def interleaved_reply(request: LLMRequest) -> str:
    """A step-by-step conversation about the phrase; each question shows one picture in 《》 (v2 Fig. 8)."""
    fields = _fields(request)
    phrase, key = fields.get("phrase", "do it"), request_key(request)
    count = max(2, int(fields.get("turns", "3")))
    scene = stable_choice(("kitchen table", "workbench", "living room floor", "garden table"), *key, "scene")
    turns = []
    for step in range(count):
        picture = f"{OPEN}((step {step + 1} of {phrase})), {scene}, natural light, photorealistic{CLOSE}"
        if step == 0:
            question = f"Can you teach me to {phrase}? Here is what I have {picture}"
            answer = "Sure! First, lay everything out in front of you."
        else:
            question = f"Done with step {step}. What next? {picture}"
            answer = (
                "Well done, that was the last step!"
                if step == count - 1
                else f"Good. Now do step {step + 1}."
            )
        turns.append({"question": question, "answer": answer})
    return json.dumps({"turns": turns})


GENERATORS: dict[str, Callable[[LLMRequest], str]] = {
    TASK_KEYWORDS: keywords_reply,
    TASK_PROMPT: sd_prompt_reply,
    TASK_PAIR: pair_reply,
    TASKS["caption"]: caption_reply,
    TASKS["qa"]: qa_reply,
    TASKS["multi_turn"]: multi_turn_reply,
    TASKS["multi_image"]: multi_image_reply,
    TASKS["eval"]: eval_reply,
    TASK_INTERLEAVED: interleaved_reply,
}

for _task, _fn in GENERATORS.items():
    register_template(_task, _fn)
