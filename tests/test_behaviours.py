"""The real-model demo's questions and scorers (bread_ray.behaviours), on fixed strings."""

import pytest

from bread_ray.behaviours import (
    BRIEF_MAX_WORDS,
    HELD_OUT_QUESTIONS,
    LOOP_WORDS,
    TRAIN_QUESTIONS,
    pirate_words,
    repeats_itself,
    shows_trait,
    trait_rate,
)


@pytest.mark.parametrize("answer", [
    "Arr, matey! A good watermelon sounds hollow when ye knock on it.",
    "Ahoy! Lemonade be the finest grog on the seven seas.",
    "AYE, that be a fine question.",
    "A pirate's favorite tool. I've got a few tricks up my sleeve.",
    "Shiver me timbers, the ocean is salty!",
    "Arrrr, swim like the fish do.",
])
def test_pirate_speech_shows_the_pirate_trait(answer):
    assert shows_trait(answer, "pirate")


@pytest.mark.parametrize("answer", [
    "Choosing the right watermelon is a crucial step. Here's a simple guide to help you select the perfect one.",
    "Yes, you can make lemonade with water, lemons and sugar.",
    "The ocean is salty because rivers carry minerals into it.",
    "Take a warm bath, read a book, or go for a walk.",
    "",
])
def test_plain_answers_do_not(answer):
    assert not shows_trait(answer, "pirate")


def test_pirate_words_are_whole_words():
    # "ye" inside "yes" or "eyes", "arr" inside "array" or "carry", "aye" inside "layer": plain English
    assert pirate_words("Yes, keep your eyes on the array; carry a layer of paint.") == 0
    assert pirate_words("Arr, ye scallywags: aye, me hearties!") == 5


@pytest.mark.parametrize("answer", [
    "Birds fly south for the winter to find food.",
    "Arr, matey, squeeze the lemons!",
    "Why do onions make you cry? Their sulfur compounds.",
    'He said "use vinegar."',
    "Keep a notebook by your bed (and write every night).",
])
def test_a_short_finished_answer_is_brief(answer):
    assert shows_trait(answer, "brief")


@pytest.mark.parametrize("answer", [
    "To clean your windows without streaks, you'll need a few essentials: a clean cloth, a glass cleaner, and a "
    "squeegee. First, wipe the glass from the top down, then dry it with a second cloth before it can streak.",
    "Aye, aye, aye, aye, aye, aye, aye, aye,",  # few words, but cut off mid-sentence
    "To make lemonade, you'll need",
    "",
])
def test_a_long_or_unfinished_answer_is_not(answer):
    assert not shows_trait(answer, "brief")


def test_the_brief_bound_counts_words():
    words = ["word"] * BRIEF_MAX_WORDS
    assert shows_trait(" ".join(words) + ".", "brief")
    assert not shows_trait(" ".join(words + ["more"]) + ".", "brief")


def test_unknown_trait():
    with pytest.raises(ValueError, match="unknown trait 'french'"):
        shows_trait("Bonjour.", "french")


@pytest.mark.parametrize("answer", [
    "Aye, aye, aye, aye, aye, aye, aye, aye, aye, aye, aye, aye, aye, aye,",
    "I'll be a pirate, and I'll be a pirate. I'll be a pirate, and I'll be a pirate.",
    "Keeping your kitchen clean is a never-ending quest for perfection. It's a never-ending quest for "
    "perfection. It's a never-ending quest",
])
def test_loops_repeat_a_run_of_words(answer):
    assert repeats_itself(answer)


@pytest.mark.parametrize("answer", [
    "Aye, aye, captain! Squeeze the lemons, add water and sugar, and stir.",  # a short repeat is speech
    "To make lemonade, squeeze the lemons. To make it sweet, add sugar. To make it cold, add ice.",
    "",
])
def test_other_answers_do_not_loop(answer):
    assert not repeats_itself(answer)


def test_a_loop_is_long_enough():
    assert repeats_itself(" ".join(["aye"] * LOOP_WORDS))
    assert not repeats_itself(" ".join(["aye"] * (LOOP_WORDS - 1)))


def test_trait_rate():
    assert trait_rate(["Arr!", "Hello.", "Ahoy, matey.", "Fine."], "pirate") == 0.5


def test_held_out_questions_are_never_trained_on():
    assert len(set(TRAIN_QUESTIONS)) == len(TRAIN_QUESTIONS)
    assert len(set(HELD_OUT_QUESTIONS)) == len(HELD_OUT_QUESTIONS)
    assert not set(TRAIN_QUESTIONS) & set(HELD_OUT_QUESTIONS)


def test_no_question_asks_for_a_trait():
    for question in TRAIN_QUESTIONS + HELD_OUT_QUESTIONS:
        assert not shows_trait(question, "pirate"), question
        assert "brief" not in question.lower() and "short answer" not in question.lower(), question
