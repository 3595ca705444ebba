"""The metric vocabulary: old manifests read under today's names, the HF Trainer's log in our
names, gold scoring and headlines on literal figures."""
import math

import pytest

from stages import engine as E
from stages import metrics as M
from stages.tasks import accuracies, gold_counts, gold_metrics


def test_round_one_manifests_read_under_namespaced_names():
    sft = {"gold_accuracy": 0.6, "parent_gold_accuracy": 0.2, "heldout_loss": 1.1,
           "parent_heldout_loss": 2.0, "gold_accuracy_by_task": {"sort": 0.5}, "eval_loss": 1.2}
    assert M.canonical(sft, "sft") == {
        "gold/accuracy": 0.6, "baseline/gold/accuracy": 0.2, "eval/loss": 1.1,
        "baseline/eval/loss": 2.0, "gold/accuracy/sort": 0.5, "eval_loss": 1.2}
    # reward_mean meant the RM's score mean in rm and the held-out RM reward in ppo
    assert M.canonical({"reward_mean": 0.1}, "rm") == {"rm/reward_mean": 0.1}
    assert M.canonical({"reward_mean": 2.5, "sft_reward_mean": 2.0, "gold_sort": 0.9,
                        "sft_gold_sort": 0.8}, "ppo") == {
        "rl/reward": 2.5, "baseline/rl/reward": 2.0, "gold/accuracy/sort": 0.9,
        "baseline/gold/accuracy/sort": 0.8}
    assert M.canonical({"val_loss": 3.0, "val_loss/c4": 3.2, "unigram_val_loss": 5.0},
                       "pretrain") == {"eval/loss": 3.0, "eval/loss/c4": 3.2,
                                       "baseline/eval/loss": 5.0}
    new = {"eval/loss": 1.0, "baseline/eval/loss": 2.0}
    assert M.canonical(new, "sft") == new


def test_headline_of_an_old_manifest_is_its_first_key_metric():
    h = M.headline_of({"stage": "pretrain", "metrics": {"val_loss": 3.0,
                                                        "unigram_val_loss": 5.0}})
    assert h["metric"] == "eval/loss" and h["text"] == "eval/loss 3 (baseline 5)"
    stored = M.headline("eval/loss", 1.0, "said by the stage")
    assert M.headline_of({"headline": stored, "metrics": {}}) is stored
    assert M.headline_of({"metrics": {}})["text"] == ""


def test_with_baseline_and_verdict():
    assert M.with_baseline({"a/x": 1.0}, {"a/x": 0.5, "a/y": 9.0}) == \
        {"a/x": 1.0, "baseline/a/x": 0.5}
    assert M.verdict(1.0, 2.0, "lower") == "beats"
    assert M.verdict(1.0, 2.0, "higher") == "does NOT beat"


def test_hf_trainer_log_in_our_names():
    from stages.engine import hf_log
    rows = hf_log([{"loss": 2.0, "learning_rate": 1e-3, "grad_norm": 0.5, "step": 1,
                    "epoch": 0.1}, {"eval_loss": 1.9, "eval_runtime": 0.3, "step": 3,
                                    "eval_num_tokens": 4000.0},
                   {"train_loss": 1.95, "train_runtime": 9.0, "rewards/chosen": 0.2}])
    # token counters are not curves to draw beside a loss
    assert rows == [{"train/loss": 2.0, "train/lr": 1e-3, "train/grad_norm": 0.5, "step": 1,
                     "epoch": 0.1}, {"eval/loss": 1.9, "perf/eval_runtime": 0.3, "step": 3,
                                     "perf/eval_num_tokens": 4000.0},
                    {"train/mean_loss": 1.95, "perf/train_runtime": 9.0,
                     "train/rewards/chosen": 0.2}]


def test_resume_takes_the_newest_complete_trainer_checkpoint(tmp_path):
    from stages.engine import last_hf_checkpoint
    assert last_hf_checkpoint(tmp_path / "none") is None
    for n, complete in ((3, True), (6, True), (9, False), (12, False)):
        (tmp_path / f"checkpoint-{n}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_hf_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")


def test_gold_scoring_per_family_and_summed_over_ranks():
    recs = [{"task": "sort", "answer": "1 2"}, {"task": "sort", "answer": "2 3"},
            {"task": "larger", "answer": "7"}, {"prompt": "open question"}]
    texts = ["1 2", "3 2", "7.", "anything"]
    assert gold_metrics(recs, texts) == {"gold/accuracy": pytest.approx(2 / 3),
                                         "gold/accuracy/larger": 1.0,
                                         "gold/accuracy/sort": 0.5, "gold/n": 3}
    # two ranks: one saw no `larger` prompt; the keys still agree, and sums give the total
    a = gold_counts(recs[:2], texts[:2], families=("larger", "sort"))
    b = gold_counts(recs[2:], texts[2:], families=("larger", "sort"))
    assert set(a) == set(b)
    total = accuracies({k: a[k] + b[k] for k in a})
    assert total == {"gold/accuracy": pytest.approx(2 / 3), "gold/accuracy/larger": 1.0,
                     "gold/accuracy/sort": 0.5}
    assert math.isnan(accuracies(gold_counts([], []))["gold/accuracy"])


def test_paired_change_counts_prompts_not_responses():
    from stages.tasks import paired_change
    # 4 prompts, sampled accuracy per prompt before and after (None: no answer to check)
    before, after = [0.25, 0.5, 0.0, None], [0.75, 0.5, 0.5, 1.0]
    delta, se, n = paired_change(before, after)
    diffs = [0.5, 0.0, 0.5]
    mean = sum(diffs) / 3
    assert n == 3 and delta == pytest.approx(mean)
    assert se == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2 / 3))
    assert paired_change([], []) == (0.0, 0.0, 0)


def test_mcnemar_exact_two_sided():
    from stages.tasks import mcnemar_p
    # 10 prompts flipped right, 2 flipped wrong, 8 unchanged: p = 2 * P(X <= 2), X ~ Bin(12, .5)
    before = [False] * 10 + [True] * 2 + [True] * 8
    after = [True] * 10 + [False] * 2 + [True] * 8
    expect = 2 * (1 + 12 + 66) / 2 ** 12
    assert mcnemar_p(before, after) == pytest.approx(expect)
    assert mcnemar_p([True, False], [True, False]) == 1.0          # nothing changed
    assert mcnemar_p([True, None], [False, True]) == 1.0           # one flip: p = 1


def test_the_training_log_splits_into_curve_and_clock():
    from stages.stage import split_log
    rows = [{"step": 1, "time": 10.0, "train/loss": 2.0, "perf/step_s": 0.5},
            {"step": 2, "time": 11.0, "train/loss": 1.5, "perf/step_s": 0.4},
            {"step": 2, "time": 20.0, "train/loss": 1.5, "perf/step_s": 0.7},   # after a resume
            {"step": 2, "eval/loss": 1.7}]
    curve, clock = split_log(rows)
    assert curve == [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5, "eval/loss": 1.7}]
    assert clock == [{"step": 1, "time": 10.0, "perf/step_s": 0.5},
                     {"step": 2, "time": 20.0, "perf/step_s": 0.7}]
    # an interrupted run, resumed, logs the same curve as one that was never stopped
    assert split_log(rows[:2] + rows[3:])[0] == curve


def test_trainer_arguments_keep_no_machine_path(tmp_path):
    from transformers import TrainingArguments
    args = TrainingArguments(output_dir=str(tmp_path / "runs" / "x" / "checkpoints"),
                             use_cpu=True, report_to=[])
    E.trainer_args_as_json(tmp_path, args)
    assert str(tmp_path) not in (tmp_path / "training_args.json").read_text()
