"""Multiple-choice fine-tuning (core/multiple_choice.py, finetune_mc.py): the head and the joint loss
against HF's OpenAIGPTDoubleHeadsModel and GPT2DoubleHeadsModel, padding, markers, the Story Cloze
reader on the real data and its refusals, and short fine-tuning runs on files of Story Cloze's format."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2DoubleHeadsModel, OpenAIGPTConfig, OpenAIGPTDoubleHeadsModel

from core import hf, training
from core.checkpoint import read_meta, save_checkpoint
from core.config import FinetuneConfig
from core.errors import UserError
from core.multiple_choice import (
    CLASSIFIER_FILE,
    MARKER_NAMES,
    ChoiceHead,
    Encoded,
    MultipleChoiceModel,
    Question,
    accuracy,
    add_markers,
    collate,
    encode_questions,
    joint_loss,
    read_questions,
    split_off,
    with_classifier,
)
from core.pretrained import load_model
from core.tokenizer import get_tokenizer
from finetune_mc import linear_learning_rate
from model import GPT, GPTConfig
from tests.gpt1_files import write_hf_gpt1_folder
from tests.stages import run_stage
from tests.story_cloze_files import HEADER, story_cloze_args
from tests.weights import redraw_weights

TOLERANCE = 1e-5
GOOD_ROW = "id{n},Tom was hungry.,He went to the store.,It was open.,He bought bread.,He ate it.,He flew away.,1"


def random_batch(vocab_size: int, n_questions: int, n_choices: int, max_len: int) -> list[Encoded]:
    """Questions of random tokens, every sequence a different length, so that the batch pads."""
    generator = torch.Generator().manual_seed(3)
    batch = []
    for index in range(n_questions):
        lengths = torch.randint(4, max_len + 1, (n_choices,), generator=generator).tolist()
        choices = tuple(torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths)
        batch.append(Encoded(index, index % n_choices, choices))
    return batch


def ours_from_double_heads(hf_model: torch.nn.Module) -> MultipleChoiceModel:
    """Our LM and head holding the weights of an HF double-heads model."""
    lm_weights = {k: v for k, v in hf_model.state_dict().items() if not k.startswith("multiple_choice_head.")}
    gpt = GPT.from_state_dict(hf.config_from_hf(hf_model.config.to_dict()), hf.state_dict_from_hf(lm_weights))
    head = ChoiceHead(gpt.config.n_embd, dropout=0.1)
    with torch.no_grad():
        head.proj.weight.copy_(hf_model.multiple_choice_head.summary.weight)
        head.proj.bias.copy_(hf_model.multiple_choice_head.summary.bias)
    return MultipleChoiceModel(gpt, head).eval()


@pytest.mark.parametrize("family", ["openai-gpt", "gpt2"])
def test_choice_logits_and_joint_loss_match_hf_double_heads(family: str) -> None:
    torch.manual_seed(1234)
    shape = dict(vocab_size=83, n_positions=32, n_embd=48, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0, summary_first_dropout=0.1)
    if family == "openai-gpt":
        hf_model = OpenAIGPTDoubleHeadsModel(OpenAIGPTConfig(**shape))
    else:
        hf_model = GPT2DoubleHeadsModel(GPT2Config(**shape))
    redraw_weights(hf_model)
    ours = ours_from_double_heads(hf_model)
    n_choices = 2 if family == "openai-gpt" else 4
    inputs = collate(random_batch(83, n_questions=3, n_choices=n_choices, max_len=32))
    hf_labels = inputs["idx"].clone()
    hf_labels[:, :, 1:][inputs["lm_targets"][:, :, :-1] == -1] = -100  # HF shifts its labels itself
    hf_labels[:, :, 0] = inputs["idx"][:, :, 0]
    with torch.no_grad():
        expected = hf_model(input_ids=inputs["idx"], mc_token_ids=inputs["extract"], labels=hf_labels,
                            mc_labels=inputs["labels"])
        logits, clf_loss, lm_loss = ours(inputs["idx"], inputs["extract"], inputs["labels"], inputs["lm_targets"])
    torch.testing.assert_close(logits, expected.mc_logits, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(clf_loss, expected.mc_loss, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(lm_loss, expected.loss, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(joint_loss(clf_loss, lm_loss, 0.5), expected.mc_loss + 0.5 * expected.loss,
                               atol=TOLERANCE, rtol=0)
    assert joint_loss(clf_loss, lm_loss, 0.0) is clf_loss
    # The comparison can fail: the same head on the last position (padding, mostly) misses by far.
    with torch.no_grad():
        last = ours(inputs["idx"], torch.full_like(inputs["extract"], inputs["idx"].shape[-1] - 1))[0]
    assert (last - expected.mc_logits).abs().max() > 100 * TOLERANCE


def test_choice_logits_do_not_change_when_the_batch_pads_longer() -> None:
    config = GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32, post_ln=True, final_ln=False)
    model = MultipleChoiceModel(redraw_weights(GPT(config)), ChoiceHead(32, dropout=0.1)).eval()
    batch = random_batch(50, n_questions=4, n_choices=2, max_len=20)
    with torch.no_grad():
        short = model(**{k: v for k, v in collate(batch).items() if k in ("idx", "extract", "lm_targets")})
        padded_inputs = collate(batch, pad_to=57)
        assert padded_inputs["idx"].shape[-1] == 57
        padded = model(padded_inputs["idx"], padded_inputs["extract"], lm_targets=padded_inputs["lm_targets"])
    torch.testing.assert_close(padded[0], short[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(padded[2], short[2], atol=1e-6, rtol=0)


def test_markers_are_new_rows_or_endoftext() -> None:
    tokenizer = get_tokenizer("gpt2")
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16, vocab_multiple=64))
    grown, grown_tokenizer, markers = add_markers(model, tokenizer, "new", torch.Generator().manual_seed(0))
    assert (markers.start, markers.delimiter, markers.extract) == (50257, 50258, 50259)
    assert grown.config.vocab_size == grown_tokenizer.n_vocab == 50260
    assert grown.transformer.wte.weight.shape[0] == 50304  # still padded to a multiple of 64
    assert torch.equal(grown.transformer.wte.weight[:50257], model.transformer.wte.weight[:50257])
    assert 0.005 < grown.transformer.wte.weight[50257:50260].std() < 0.05
    assert grown_tokenizer.decode([markers.start, 464, markers.extract]) == "<|start|>The<|extract|>"
    question = Question(0, "Tom was hungry.", ("He ate.", "He flew."), 0)
    [encoded], cropped = encode_questions([question], grown_tokenizer, markers, block_size=64)
    context, ending = tokenizer.encode_ordinary("Tom was hungry."), tokenizer.encode_ordinary(" He ate.")
    assert encoded.choices[0] == [50257, *context, 50258, *ending, 50259] and cropped == 0
    [short], cropped = encode_questions([question], grown_tokenizer, markers, block_size=len(ending) + 5)
    assert short.choices[0] == [50257, *context[-2:], 50258, *ending, 50259] and cropped == 2
    again = add_markers(grown, grown_tokenizer, "new")
    assert again[0] is grown and again[2] == markers  # a fine-tuned model keeps its markers
    _, _, eot = add_markers(model, tokenizer, "eot")
    assert (eot.start, eot.delimiter, eot.extract) == (50256, 50256, 50256)


def test_linear_schedule_warms_up_then_decays_to_zero() -> None:
    lrs = [linear_learning_rate(step, 1.0, warmup_steps=2, max_steps=10) for step in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] == pytest.approx(0.125)
    assert all(a > b for a, b in itertools.pairwise(lrs[2:]))


# --- data ---------------------------------------------------------------------------------------------

def test_story_cloze_reader_and_the_papers_split(story_cloze: Path) -> None:
    questions = read_questions(story_cloze / "cloze_test_val_spring2016.csv")
    assert len(questions) == 1871
    first = questions[0]
    assert first.context.startswith("Rick grew up in a troubled household. He never found good support")
    assert first.endings == ("He is happy now.", "He joined a gang.") and first.label == 0
    assert {q.label for q in questions} == {0, 1}
    train, val = split_off(questions, 374, seed=42)
    assert (len(train), len(val)) == (1497, 374)
    assert {q.index for q in train}.isdisjoint(q.index for q in val)
    assert split_off(questions, 374, seed=42) == (train, val)
    assert split_off(questions, 374, seed=43)[1] != val


@pytest.mark.parametrize("lines, row, message", [
    ([HEADER.replace(",AnswerRightEnding", "")], 1, "missing column(s) AnswerRightEnding"),
    ([HEADER + ",RandomFifthSentenceQuiz3"], 1, "Story Cloze has 2 endings, this header has 3"),
    ([HEADER, GOOD_ROW.format(n=1), GOOD_ROW.format(n=2).replace(",He flew away.", "")], 3,
     "7 fields where the header has 8"),
    ([HEADER, GOOD_ROW.format(n=1).replace(",1", ",He swam.,1")], 2, "9 fields where the header has 8"),
    ([HEADER, GOOD_ROW.format(n=1), GOOD_ROW.format(n=2).removesuffix("1") + "3"], 3,
     "AnswerRightEnding must be 1 or 2, got '3'"),
    ([HEADER, GOOD_ROW.format(n=1).removesuffix("1") + "first"], 2, "AnswerRightEnding must be 1 or 2, got 'first'"),
    ([HEADER, *[GOOD_ROW.format(n=n) for n in range(3)], GOOD_ROW.format(n=9).replace("He ate it.", " ")], 5,
     "RandomFifthSentenceQuiz1 is empty"),
], ids=["missing-column", "three-endings-header", "missing-field", "extra-ending", "answer-3", "answer-text",
        "empty-ending"])
def test_malformed_story_cloze_rows_fail_with_their_row(lines: list[str], row: int, message: str,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as raised:
        read_questions(path)
    assert str(raised.value).startswith(f"{path}, row {row}")
    assert message in str(raised.value)


def test_hellaswag_format_with_the_wrong_number_of_endings_fails_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = {"ctx": "A man sits.", "endings": ["a", "b", "c", "d"], "label": 2}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "endings": ["a", "b", "c"]}) + "\n")
    with pytest.raises(UserError, match=rf"^{path}, line 2: 'endings' must be a list of 4"):
        read_questions(path)
    path.write_text(json.dumps(good) + "\n")
    assert read_questions(path) == [Question(0, "A man sits.", ("a", "b", "c", "d"), 2)]


def test_finetune_mc_reports_a_malformed_row_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("\n".join([HEADER, GOOD_ROW.format(n=1), GOOD_ROW.format(n=2).removesuffix("1") + "0"]) + "\n")
    status, _, err = run_stage("finetune_mc", ["--train-data", str(path), "--init-from", "nowhere"],
                               monkeypatch, capsys)
    assert status == 2
    assert err.strip() == f"finetune_mc.py: error: {path}, row 3: AnswerRightEnding must be 1 or 2, got '0'"


# --- fine-tuning runs ---------------------------------------------------------------------------------

def read_records(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def test_finetuning_a_small_gpt2_learns_story_cloze(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "pretrained", model, "gpt2")
    args = story_cloze_args(tmp_path, tmp_path / "log", tmp_path / "pretrained", 150, 40, max_train_examples=120,
                            val_examples=24, max_test_examples=32, epochs=12, batch_size=16, micro_batch_size=16,
                            max_lr=3e-3, lm_coef=0, dropout=0, clf_dropout=0, zero_shot="false")
    status, out, err = run_stage("finetune_mc", args, monkeypatch, capsys)
    assert status == 0, err
    records = read_records(tmp_path / "log")
    steps = [r for r in records if r["kind"] == "train"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(steps) == 12 * 6 and len(epochs) == 12  # 96 train questions: 6 steps of 16 per epoch
    assert "lm_loss" not in steps[0]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # chance, at the start
    assert epochs[-1]["train_loss"] < 0.3 * epochs[0]["train_loss"]
    assert epochs[-1]["train_acc"] >= 0.9  # chance is 0.5
    assert "| epoch 12 |" in out and "best epoch by val accuracy" in out


def test_finetuning_gpt1_with_the_lm_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    write_hf_gpt1_folder(tmp_path / "openai-gpt", n_positions=256, n_embd=32, n_layer=2, n_head=2, std=0.02)
    args = story_cloze_args(tmp_path, tmp_path / "log", tmp_path / "openai-gpt", 60, 8, max_train_examples=40,
                            val_examples=8, max_test_examples=8, epochs=2, batch_size=8, micro_batch_size=4,
                            max_lr=1e-3, eval_batch_size=4)  # lm_coef 0.5, the paper's, by default
    status, out, err = run_stage("finetune_mc", args, monkeypatch, capsys)
    assert status == 0, err
    records = read_records(tmp_path / "log")
    assert [r["split"] for r in records if r["kind"] == "zero_shot"] == ["val", "test"]
    steps = [r for r in records if r["kind"] == "train"]
    assert len(steps) == 2 * 4 and all(math.isfinite(r["lm_loss"]) for r in steps)
    assert all(r["loss"] == pytest.approx(r["clf_loss"] + 0.5 * r["lm_loss"], rel=1e-5) for r in steps)
    [summary] = [r for r in records if r["kind"] == "summary"]
    best = tmp_path / "log" / "best"
    meta = read_meta(best)
    assert meta["epoch"] == summary["best_epoch"] and meta["added_tokens"] == list(MARKER_NAMES)
    assert (best / CLASSIFIER_FILE).is_file() and (best / "vocab.json").is_file()
    gpt, tokenizer = load_model(str(best))  # as any checkpoint: sample.py and hellaswag.py read it so
    model, markers = with_classifier(gpt, best)
    assert markers.extract == tokenizer.n_vocab - 1 == model.gpt.config.vocab_size - 1
    labelled = read_questions(tmp_path / "train.csv", limit=40)
    _, val = split_off(labelled, 8, seed=42)
    encoded, _ = encode_questions(val, tokenizer, markers, model.gpt.config.block_size)
    assert accuracy(model, encoded, batch_size=4) == summary["best_val_acc"]
    assert gpt.config.post_ln and gpt.config.vocab_size == tokenizer.n_vocab
    assert "| zero-shot (acc) |" in out



@pytest.mark.parametrize("name, model", [("storycloze_gpt1", "openai-gpt"), ("storycloze_gpt2", "gpt2")])
def test_story_cloze_configs_carry_the_papers_settings(name: str, model: str) -> None:
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml"
    config = FinetuneConfig.from_argv(["--config", str(path)])
    assert config.init_from == model
    assert (config.max_lr, config.batch_size, config.epochs, config.lm_coef, config.warmup_fraction,
            config.clf_dropout, config.val_examples) == (6.25e-5, 32, 3, 0.5, 0.002, 0.1, 374)
    with pytest.raises(UserError, match="unknown key 'lm_coeff'; did you mean 'lm_coef'"):
        FinetuneConfig.from_argv(["--config", str(path), "--lm-coeff", "1"])


def test_an_interrupted_finetuning_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    """2 epochs straight equal 1 epoch, a crash right after its checkpoint, then a rerun (--resume auto):
    the same best/ weights and the same records, dropout on, so the random states must come back."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "pretrained", GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=1, n_head=2,
                                                           n_embd=16)), "gpt2")

    def finetune(log_dir: Path) -> tuple[int, str, str]:
        args = story_cloze_args(tmp_path, log_dir, tmp_path / "pretrained", 60, 8, max_train_examples=40,
                                val_examples=8, max_test_examples=8, epochs=2, batch_size=8, micro_batch_size=4,
                                max_lr=1e-3, dropout=0.1, clf_dropout=0.1)
        return run_stage("finetune_mc", args, monkeypatch, capsys)

    assert finetune(tmp_path / "straight")[0] == 0
    save = training.save_checkpoint

    def save_then_crash(folder: Path, *args: object, **kwargs: object) -> Path:
        save(folder, *args, **kwargs)
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(training, "save_checkpoint", save_then_crash)
    with pytest.raises(RuntimeError, match="went away"):
        finetune(tmp_path / "resumed")
    monkeypatch.setattr(training, "save_checkpoint", save)
    status, out, err = finetune(tmp_path / "resumed")
    assert status == 0, err
    assert "resuming from" in out and "at step 4" in out  # 32 train questions, batches of 8: 4 steps an epoch
    straight, resumed = read_records(tmp_path / "straight"), read_records(tmp_path / "resumed")
    assert resumed == straight
    for name, tensor in load_file(tmp_path / "straight" / "best" / "model.safetensors").items():
        assert torch.equal(load_file(tmp_path / "resumed" / "best" / "model.safetensors")[name], tensor), name
    status, out, _ = finetune(tmp_path / "resumed")  # once more: complete already
    assert status == 0 and "complete already, nothing to do" in out
    assert read_records(tmp_path / "resumed") == resumed
