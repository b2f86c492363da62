"""Every stage's command line (#21 case 14): each flag has a one-line description (the settings' own,
for the trainers), the trainers' flags come in groups, and no flag may be abbreviated."""

from __future__ import annotations

import argparse
import importlib

import pytest

from core.cli import StageParser

STAGES = ["fineweb", "train_gpt2", "finetune_mc", "sample", "hellaswag", "evaluate", "export_hf", "plot"]


class ParsedError(Exception):
    """Raised in place of parsing, carrying the stage's parser out."""


def stage_parser(stage: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise ParsedError(self)

    monkeypatch.setattr(StageParser, "parse_known_args", capture)
    monkeypatch.setattr("sys.argv", [f"{stage}.py"])
    with pytest.raises(ParsedError) as parsed:
        importlib.import_module(stage).main()
    return parsed.value.args[0]


@pytest.mark.parametrize("stage", STAGES)
def test_every_flag_is_described_and_none_is_abbreviated(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = stage_parser(stage, monkeypatch)
    assert parser.allow_abbrev is False
    undescribed = [action.dest for action in parser._actions
                   if not action.help or action.help.startswith("(default") or action.help == argparse.SUPPRESS]
    assert undescribed == []


@pytest.mark.parametrize("stage", ["train_gpt2", "finetune_mc"])
def test_the_trainers_flags_are_grouped_as_a_user_thinks_of_them(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = stage_parser(stage, monkeypatch)
    groups = {group.title: [action.dest for action in group._group_actions] for group in parser._action_groups}
    titled = [title for title, flags in groups.items() if flags and title not in ("options", "positional arguments")]
    assert len(titled) >= 4
    assert all(len(flags) <= 20 for flags in groups.values())  # not 40+ flags in one block
    resume = next(action for action in parser._actions if action.dest == "resume")
    assert all(word in resume.help for word in ("auto", "never", "PATH"))
