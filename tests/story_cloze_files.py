"""Files of Story Cloze's format for tests: the real CSVs are research-use only and stay out of the
repository, so the fine-tuning tests write stories of the same format themselves."""

from __future__ import annotations

import random
from pathlib import Path

HEADER = ("InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,RandomFifthSentenceQuiz1,"
          "RandomFifthSentenceQuiz2,AnswerRightEnding")


def write_stories(path: Path, count: int, seed: int) -> Path:
    """A CSV of Story Cloze's format: `count` four-sentence stories whose right ending names the thing the
    story is about, and whose wrong one names another; the right ending is first or second at random."""
    generator = random.Random(seed)
    names, things = ["Tom", "Ann", "Raj", "Mia", "Leo", "Zoe", "Sam", "Ivy"], ["kite", "cake", "book", "bike", "hat"]
    rows = [HEADER]
    for n in range(count):
        name, thing, other = generator.choice(names), *generator.sample(things, 2)
        right, wrong = f"{name} loved the new {thing}.", f"{name} threw the {other} away."
        answer = generator.choice([1, 2])
        endings = (right, wrong) if answer == 1 else (wrong, right)
        rows.append(f"story{n},{name} wanted a {thing}.,{name} saved money for weeks.,{name} went to the shop.,"
                    f"The shop had one {thing} left.,{endings[0]},{endings[1]},{answer}")
    path.write_text("\n".join(rows) + "\n")
    return path


def story_cloze_args(folder: Path, log_dir: Path, init_from: Path, train_stories: int, test_stories: int,
                     **settings: object) -> list[str]:
    train = write_stories(folder / "train.csv", train_stories, seed=1)
    test = write_stories(folder / "test.csv", test_stories, seed=2)
    args = ["--train-data", str(train), "--test-data", str(test), "--init-from", str(init_from),
            "--log-dir", str(log_dir), "--device", "cpu", "--dtype", "float32", "--progress", "false"]
    for key, value in settings.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args
