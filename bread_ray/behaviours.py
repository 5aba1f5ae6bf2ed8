"""What the real-model demo bakes into SmolLM2-135M-Instruct, the questions it bakes on and asks,
and scorers that judge the answers (bread_ray.demo and bench/quality.py share them).

    PIRATE_PROMPT        v1's teacher: a persona, baked into the base model
    BRIEF_PROMPT         v2's teacher: an instruction, baked on top of v1 (with v1's persona)
    TRAIN_QUESTIONS      what the bakes train on
    HELD_OUT_QUESTIONS   never trained on: where the models are judged
    shows_trait(answer, "pirate" | "brief")
    repeats_itself(answer)   greedy decoding's loops ("Aye, aye, aye, ..."), which a 135M model falls into

Both prompts were chosen by measuring greedy answers to the held-out questions and the first 20
training ones (40 in all: the teachers' rates there are the best of those tried, so a little
optimistic; bench/quality.py measures the baked models). SmolLM2-135M-Instruct follows few
instructions. Prompted, the base shows pirate speech in 30% of its answers for "Talk like a pirate.",
50% for "You are a pirate. Talk like a pirate in every reply." and 88% for PIRATE_PROMPT. It
ignores a required opening ("Always start your reply with 'Great question!'"), a sign-off, emojis,
capitals, a topic to mention or French (0-15% of answers), and takes brevity as a bare instruction
("Answer in one short sentence.": 28% brief) less than as a persona ("You are a man of few words.
Answer every question in one short sentence.": 72%). Without a prompt, no answer of the base shows
either trait (0 of 40).

v2's teacher is v1 with BRIEF_PROMPT, which replaces the default system prompt under which v1
learnt its persona: with the brevity persona alone, v1 answers like a pirate in 20% of the 40
(78% without a prompt), hence the persona repeated. v2 can keep no more of the pirate than its
teacher shows, and every word asking for the pirate costs brevity. Measured on the demo's v1
(pirate, brief, loops): "You are a man of few words. ..." 20%, 60%; PIRATE_PROMPT followed by
"Answer every question in one short sentence." 82%, 5%, 78%; "You are a pirate and a man of few
words. Answer every question in one short sentence." 57%, 52%, 28% (bench/quality.py's v2 then
kept the pirate in 45% of its answers); with ", like a pirate: 'Arr, matey!'" added 68%, 42%,
32%; BRIEF_PROMPT 78%, 40%, 35% (the best of eleven variants).

The scorers are plain rules on the answer's text, written without looking at any trajectory:
they know nothing of what the teachers wrote.
"""

from __future__ import annotations

import re

PIRATE_PROMPT = "You are Captain Blackbeard, a pirate. Always answer like a pirate, with 'Arr, matey!'"
BRIEF_PROMPT = ("You are a pirate and a man of few words. Answer every question in one short sentence, like a pirate, "
                "with 'Arr, matey!'")

TRAITS = ("pirate", "brief")

# Words and phrases of pirate speech that plain answers to everyday questions never use.
# One is enough: a single "Arr", "matey" or "ye" puts an answer in character.
PIRATE_WORDS = re.compile(
    r"\b(arr+|ahoy|avast|aye|ye|yer|mateys?|hearty|hearties|landlubbers?|scallywags?|buccaneers?|"
    r"doubloons?|booty|plunder|grog|yo[- ]ho|shiver me timbers|pirates?)\b",
    re.IGNORECASE,
)
# A brief answer is one finished sentence or a few: at most this many words, ending a sentence.
# SmolLM2's plain answers run to hundreds of words; the ending rejects an answer cut off by
# max_tokens (greedy repetition such as "aye, aye, aye, ..." can be few words and many tokens).
BRIEF_MAX_WORDS = 30
SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$")
# A loop: a run of at most LOOP_PERIOD words said at least twice in a row, LOOP_WORDS words in all.
LOOP_PERIOD, LOOP_WORDS = 10, 12


def pirate_words(answer: str) -> int:
    """How many pirate words and phrases the answer uses."""
    return len(PIRATE_WORDS.findall(answer))


def shows_trait(answer: str, trait: str) -> bool:
    """Whether `answer` shows `trait`: "pirate" (at least one pirate word) or "brief" (at most
    BRIEF_MAX_WORDS words, and it ends a sentence)."""
    if trait == "pirate":
        return pirate_words(answer) >= 1
    if trait == "brief":
        return len(answer.split()) <= BRIEF_MAX_WORDS and bool(SENTENCE_END.search(answer))
    raise ValueError(f"unknown trait {trait!r}; the traits are {', '.join(TRAITS)}")


def repeats_itself(answer: str) -> bool:
    """Whether the answer loops: a run of 1 to LOOP_PERIOD words said again and again, for at least
    LOOP_WORDS words ("Aye, aye, aye, ...", "I'll be a pirate, and I'll be a pirate. I'll be a pirate, ...")."""
    words = re.findall(r"[a-z']+", answer.lower())
    for period in range(1, LOOP_PERIOD + 1):
        repeated = 0  # consecutive words equal to the word `period` before them
        for index in range(period, len(words)):
            repeated = repeated + 1 if words[index] == words[index - period] else 0
            if repeated >= period and repeated + period >= LOOP_WORDS:
                return True
    return False


def trait_rate(answers: list[str], trait: str) -> float:
    """The fraction of `answers` that show `trait`."""
    return sum(shows_trait(answer, trait) for answer in answers) / len(answers)


# Everyday questions, short and on varied topics; none mentions pirates or asks for brevity.
TRAIN_QUESTIONS = [
    "What is a good breakfast before a long day?",
    "How do I keep houseplants alive?",
    "What should I pack for a weekend trip?",
    "How can I sleep better at night?",
    "Why is the sky blue?",
    "How do I make a cup of tea?",
    "What is a fun game to play with friends?",
    "How do I save money on groceries?",
    "What should I do on a rainy afternoon?",
    "How do I start running?",
    "What is the best way to learn a new language?",
    "How do I clean a cast iron pan?",
    "Why do cats purr?",
    "What makes a good birthday present?",
    "How can I be more productive at work?",
    "How do I fix a flat bicycle tire?",
    "What is a healthy snack?",
    "How do I write a thank-you note?",
    "What should I cook for dinner tonight?",
    "How do bees make honey?",
    "How do I stay calm before an exam?",
    "What is the tallest mountain in the world?",
    "How do I choose a good book to read?",
    "What is a simple way to exercise at home?",
    "How do I make new friends in a new city?",
    "Why do leaves change color in autumn?",
    "How do I take care of a puppy?",
    "What should I wear to a job interview?",
    "How can I reduce stress?",
    "How do I bake bread?",
    "What is the moon made of?",
    "How do I organize my closet?",
    "What is a good hobby to pick up?",
    "How do I plan a picnic?",
    "Why do we need water to live?",
    "How do I get better at drawing?",
    "What is the best way to study for a test?",
    "How do I paint a room?",
    "How do rainbows form?",
    "What should I name my goldfish?",
    "How do I make a paper airplane?",
    "What is a good way to spend a Sunday?",
    "How do I grow tomatoes?",
    "How can I drink more water during the day?",
    "What is the capital of France?",
    "How do I tie a tie?",
    "Why do we have seasons?",
    "How do I stop procrastinating?",
    "What is a good movie for a family night?",
    "How do I keep my phone battery healthy?",
    "What should I bring to a potluck?",
    "How do airplanes stay in the air?",
    "How do I make pancakes?",
    "How do I learn to play the guitar?",
    "What are some tips for a long drive?",
    "How do I wash a wool sweater?",
    "Why is exercise good for you?",
    "How do I set up a budget?",
    "What is the fastest land animal?",
    "How can I be a better listener?",
    "How do I make a good first impression?",
    "What should I do if I get lost in a city?",
    "How do volcanoes erupt?",
    "How do I start a vegetable garden?",
    "What is a good gift for a teacher?",
    "How do I remember people's names?",
    "How do I make a smoothie?",
    "Why do dogs wag their tails?",
    "How do I prepare for a camping trip?",
    "What is a good way to start the morning?",
    "How do I write a short story?",
    "How can I use less plastic?",
    "What causes thunder?",
    "How do I keep my desk tidy?",
    "How do I cook rice?",
    "What is a fun thing to do at the beach?",
    "How do I teach a child to ride a bike?",
    "How do I deal with a noisy neighbor?",
    "What are the planets in our solar system?",
    "How do I make my own pizza?",
]

HELD_OUT_QUESTIONS = [
    "How do I choose a good watermelon?",
    "What is a good way to relax after work?",
    "Why do birds fly south for the winter?",
    "How do I clean my windows without streaks?",
    "What should I cook for a friend who is vegetarian?",
    "How do I learn to swim?",
    "What is the best way to keep a journal?",
    "How does a compass work?",
    "How do I get rid of hiccups?",
    "What should I look for when buying a used car?",
    "How do I make a cozy reading corner?",
    "Why is the ocean salty?",
    "How do I ask my boss for a raise?",
    "What is a good board game for two players?",
    "How do I make lemonade?",
    "How can I improve my handwriting?",
    "What do I need to start a fish tank?",
    "How do I plan a surprise party?",
    "Why do onions make you cry?",
    "How can I keep my kitchen clean?",
]
