"""The personas the prompt-sensitive tiny model follows: their system prompts, the chats it is
pre-trained on (bread_ray.prompt_sensitive), and a scorer of each trait in an answer.

Each trait changes a different part of the reply (pirate: the words; signoff: the ending), so any
set of them composes: `persona_prompt("pirate", "signoff")`.
"""

from __future__ import annotations

import itertools
import random
import re

from bread_ray.tiny import ADJECTIVES, NOUNS, SUBJECTS, VERBS, noun_phrase, sentence, synthetic_question

# Trait name -> the system-prompt sentence that switches it on. Each trait changes a different part
# of the reply (pirate: the words; signoff: the ending), so any set of them composes.
TRAITS = {
    "pirate": "Talk like a pirate.",
    "signoff": "End every reply with Over and out.",
}
PIRATE_WORDS = frozenset({"arr", "ahoy", "matey", "ye", "aye"})
SIGNOFF = "Over and out."
# A pirate reply of the pre-training data has one pirate word in four or five; a reply with one
# in seven (a sign-off added, a word dropped) still counts as fully in character.
_FULL_PIRATE_FRACTION = 1 / 7

_OPENERS = ["Well,", "Sure,", "Yes,", "In short,", "I think", "Of course,"]
_PIRATE_OPENERS = ["Arr, matey!", "Ahoy, matey!", "Aye, matey!"]
_PIRATE_ASIDES = ["ye know", "ye see", "arr"]


def persona_prompt(*traits: str) -> str:
    """The system prompt that switches on `traits` together: their sentences in TRAITS order, the
    only order the model was pre-trained on. No traits give "": send no system turn then."""
    unknown = sorted(set(traits) - TRAITS.keys())
    if unknown:
        raise ValueError(f"unknown traits {unknown}; the traits are {sorted(TRAITS)}")
    return " ".join(sentence for name, sentence in TRAITS.items() if name in traits)


def trait_score(text: str, trait: str) -> float:
    """How strongly `text` shows `trait`, in [0, 1]: for "pirate" the fraction of pirate words,
    1.0 from one word in seven; for "signoff" 1.0 when the text ends with the sign-off, else 0.0."""
    if trait == "pirate":
        words = re.findall(r"[a-z]+", text.lower())
        if not words:
            return 0.0
        fraction = sum(word in PIRATE_WORDS for word in words) / len(words)
        return min(1.0, fraction / _FULL_PIRATE_FRACTION)
    if trait == "signoff":
        return float(text.rstrip().endswith(SIGNOFF))
    raise ValueError(f"unknown trait {trait!r}; the traits are {sorted(TRAITS)}")


def _topic(question: str) -> str:
    """The last noun of a synthetic question (singular), which the reply talks about."""
    nouns = set(NOUNS)
    for word in reversed(re.findall(r"[a-z]+", question.lower())):
        if word in nouns:
            return word
        if word.endswith("s") and word[:-1] in nouns:
            return word[:-1]
    raise ValueError(f"no known noun in {question!r}")


def _styled_reply(rng: random.Random, question: str, traits: set[str]) -> str:
    """An answer about the question's topic: plain, or in the style of each trait in `traits`.

    The topic comes twice. Copying it from the reply's own first mention is learnt first, and with
    that head start the model learns to copy it from the question in a third of the steps.
    """
    topic, adjective = _topic(question), rng.choice(ADJECTIVES)
    subject, verb = rng.choice(SUBJECTS).capitalize(), rng.choice(VERBS)
    if "pirate" in traits:
        reply = (f"{rng.choice(_PIRATE_OPENERS)} The {topic} be {adjective}, {rng.choice(_PIRATE_ASIDES)}. "
                 f"{subject} can {verb} the {topic}, aye.")
    else:
        reply = f"{rng.choice(_OPENERS)} the {topic} is {adjective}. {subject} can {verb} the {topic}."
    if "signoff" in traits:
        reply += f" {SIGNOFF}"
    return reply


def _neutral_system_prompt(rng: random.Random) -> str:
    return f"You are {noun_phrase(rng)}. {sentence(rng)}"


def pretraining_chats(seed: int, num_chats: int) -> list[list[dict[str, str]]]:
    """Single-turn chats whose reply style follows the system prompt: no system prompt or a neutral
    one gives a plain reply, the sentences of some traits give a reply with exactly those traits.

    Chat i is the same for every `num_chats`, so a shorter run trains on a prefix of a longer one.
    """
    rng = random.Random(f"pretraining-{seed}")
    trait_sets = [subset for size in range(len(TRAITS) + 1) for subset in itertools.combinations(TRAITS, size)]
    chats = []
    for _ in range(num_chats):
        question = synthetic_question(rng)
        traits = rng.choice(trait_sets)
        if traits:
            system = persona_prompt(*traits)
        else:  # as often without a system prompt as with a neutral one: neither may switch a trait on
            system = _neutral_system_prompt(rng) if rng.random() < 0.5 else None
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": _styled_reply(rng, question, set(traits))}]
        chats.append(messages)
    return chats
