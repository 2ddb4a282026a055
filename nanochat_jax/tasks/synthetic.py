"""Synthetic tasks, generated offline from a seed: SpellingBee and SimpleSpelling (from a word list) and
calculator arithmetic. Item i of the train split comes from seed 2i, of the test split from seed 2i+1,
so the splits never share a seed (STAGES.md §1's decision; the reference's test item i was train item
i + 1). `limit` is the task's size (default 1000).
"""
from __future__ import annotations

import functools
import os
import random

from nanochat_jax.config import UserError
from nanochat_jax.tasks.base import Task
from nanochat_jax.tasks.gsm8k import FinalAnswerTask
from nanochat_jax.tools import calculate

WORD_LIST = "/usr/share/dict/american-english"  # Debian's wamerican
DEFAULT_SIZE = 1000


@functools.lru_cache(maxsize=None)
def words() -> tuple[str, ...]:
    """Lower-case alphabetic words, sorted: wamerican's list, else the `english-words` package's."""
    if os.path.exists(WORD_LIST):
        with open(WORD_LIST, encoding="utf-8", errors="replace") as f:
            found = f.read().split()
    else:
        try:
            from english_words import get_english_words_set
        except ImportError:
            raise UserError(f"no word list for the spelling tasks: install Debian's wamerican ({WORD_LIST}) "
                            "or `pip install english-words`") from None
        found = get_english_words_set(["web2"], lower=True)
    return tuple(sorted({w for w in found if w.isascii() and w.isalpha() and w.islower()}))


class SyntheticTask(Task):
    splits = ("train", "test")

    def __init__(self, split: str = "train", limit: int | None = None, data_dir=None):
        self.split, self.size = split, DEFAULT_SIZE if limit is None else limit

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self.make(random.Random(2 * index + (self.split == "test")))

    def make(self, rng: random.Random) -> dict:
        raise NotImplementedError


# "How many r are in strawberry", in several languages; {letter} and {word} may get quoted.
TEMPLATES = [
    "How many {letter} are in the word {word}?", "How many times does the letter {letter} appear in {word}?",
    "Count how many times {letter} occurs in {word}.", "In the word {word}, how many {letter} are there?",
    "How often does {letter} show up in {word}?", "What is the number of {letter} in {word}?",
    "Tell me how many {letter} the word {word} contains.", "Can you count the letter {letter} in {word}?",
    "Please count the occurrences of {letter} in {word}.", "How many {letter} does {word} have?",
    "Number of {letter} in {word}?", "Count {letter} in {word}", "{word}: how many {letter}?",
    "I need to know how many {letter} appear in {word}.", "How many copies of the letter {letter} are in {word}?",
    "Does {word} contain the letter {letter}? How many times?", "Quick question: how many {letter} in {word}?",
    "Find the number of times {letter} appears in the word {word}.", "how many {letter} in {word}",
    "Letter count: {letter} in {word}?", "If you spell {word}, how many {letter} do you write?",
    "Exactly how many {letter} can be found in {word}?",
    "¿Cuántas veces aparece la letra {letter} en {word}?", "Cuenta las letras {letter} en la palabra {word}.",
    "¿Cuántas {letter} tiene {word}?", "Combien de {letter} y a-t-il dans le mot {word} ?",
    "Combien de fois la lettre {letter} apparaît-elle dans {word} ?", "Compte les {letter} dans {word}.",
    "Wie viele {letter} hat das Wort {word}?", "Wie oft kommt der Buchstabe {letter} in {word} vor?",
    "Zähle die {letter} in {word}.", "Quante {letter} ci sono nella parola {word}?",
    "Quante volte compare la lettera {letter} in {word}?", "Quantas letras {letter} existem na palavra {word}?",
    "Quantas vezes a letra {letter} aparece em {word}?", "Hoeveel keer komt de letter {letter} voor in {word}?",
    "{word}这个单词里有几个{letter}？", "单词{word}中字母{letter}出现了几次？", "{word}という単語に{letter}はいくつありますか？",
    "{word}에 {letter}가 몇 개 있나요?", "Сколько букв {letter} в слове {word}?", "{word} kelimesinde kaç tane {letter} var?",
    "Ile liter {letter} jest w słowie {word}?", "Hur många {letter} finns det i ordet {word}?",
    "{word} शब्द में {letter} कितनी बार आता है?", "كم مرة يظهر الحرف {letter} في كلمة {word}؟",
    "Có bao nhiêu chữ {letter} trong từ {word}?", "Ada berapa huruf {letter} dalam kata {word}?",
    "Hvor mange {letter} er der i ordet {word}?", "Kuinka monta {letter}-kirjainta sanassa {word} on?",
]


class SpellingBee(FinalAnswerTask, SyntheticTask):
    """Count a letter in a word: spell it out, count by hand, check with the calculator, `#### n`."""

    name = "spelling_bee"

    def make(self, rng: random.Random) -> dict:
        word = rng.choice(words())
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        template = rng.choice(TEMPLATES)
        template = template.lower() if rng.random() < 0.3 else template
        quote_letter, quote_word = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        question = template.format(letter=quote_letter + letter + quote_letter, word=quote_word + word + quote_word)
        steps, count = [], 0
        for i, c in enumerate(word, 1):
            count += c == letter
            steps.append(f"{i}:{c} hit! count={count}" if c == letter else f"{i}:{c}")
        by_hand = (f"I need to count the letter '{letter}' in '{word}'. Spelled out, the word is:\n"
                   f"{word}:{','.join(word)}\n\nGoing through it one letter at a time:\n" + "\n".join(steps)
                   + f"\n\nThat makes {count}. Let me check with Python:\n\n")
        parts = [{"type": "text", "text": by_hand}, {"type": "python", "text": f"'{word}'.count('{letter}')"},
                 {"type": "python_output", "text": str(word.count(letter))},
                 {"type": "text", "text": f"\n\nPython also says {count}.\n\n#### {count}"}]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}


class SimpleSpelling(SyntheticTask):
    """`Spell the word: apple` -> `apple:a,p,p,l,e` (training only)."""

    name = "simple_spelling"

    def make(self, rng: random.Random) -> dict:
        word = rng.choice(words())
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}


class Arithmetic(FinalAnswerTask, SyntheticTask):
    """`What is 37 * 45 + 12?`: one or two operations on integers 1-99, answered through the calculator."""

    name = "arithmetic"
    QUESTIONS = ["What is {e}?", "Calculate {e}.", "Compute {e}", "What does {e} equal?", "{e} = ?",
                 "Please work out {e}.", "Evaluate {e}.", "what's {e}"]
    OPENINGS = ["Let me compute that.", "I'll use the calculator:", "Using Python:", "Let me calculate."]

    def make(self, rng: random.Random) -> dict:
        expr = str(rng.randint(1, 99))
        for _ in range(rng.randint(1, 2)):
            expr += f" {rng.choice('+-*')} {rng.randint(1, 99)}"
        result = calculate(expr)
        parts = [{"type": "text", "text": rng.choice(self.OPENINGS) + "\n\n"}, {"type": "python", "text": expr},
                 {"type": "python_output", "text": result},
                 {"type": "text", "text": f"\n\n{expr} = {result}\n\n#### {result}"}]
        return {"messages": [{"role": "user", "content": rng.choice(self.QUESTIONS).format(e=expr)},
                             {"role": "assistant", "content": parts}]}
