import json

import pytest
import yaml

from stages import examples as X
from stages import tasks
from stages.artifacts import ArtifactStore
from stages.configfile import ConfigError
from stages.data import DataError
from tests.conftest import REPO


def test_tasks_are_correct_and_deterministic():
    exs = tasks.generate(list(tasks.FAMILIES), 200, seed=3)
    assert exs == tasks.generate(list(tasks.FAMILIES), 200, seed=3)
    assert {e["task"] for e in exs} == set(tasks.FAMILIES)
    for e in exs:
        assert e["answer"] != e["wrong"]
        if e["task"] == "add":
            a, b = (int(x) for x in e["prompt"][len("What is "):-1].split(" + "))
            assert int(e["answer"]) == a + b
        if e["task"] == "sort":
            nums = e["prompt"].split(": ")[1].split()
            assert e["answer"].split() == sorted(nums, key=int)
        if e["task"] == "larger":
            a, b = (int(x) for x in e["prompt"][len("Which number is larger, "):-1].split(" or "))
            assert int(e["answer"]) == max(a, b)


def test_checker():
    assert tasks.check("52", " 52\nmore text") and tasks.check("52", "52.")
    assert not tasks.check("52", "37") and not tasks.check("2 7 9", "2 9 7")
    with pytest.raises(ValueError, match="unknown task family"):
        tasks.make("chess", __import__("random").Random(0), __import__("random").Random(1))


def test_eval_prompts_never_in_training():
    held = tasks.generate(["add", "reverse"], 30, seed=1, held=True, unique=True)
    assert len({e["prompt"] for e in held}) == 30
    # The split is a property of the prompt, the same for every set and seed: what one stage
    # holds out no other stage trains on.
    for seed in (0, 5):
        train = tasks.generate(["add", "reverse"], 500, seed=seed)
        assert not {e["prompt"] for e in held} & {e["prompt"] for e in train}
    share = sum(map(tasks.held_out, (f"What is {a} + {b}?" for a in range(20) for b in range(10))))
    assert share == 52          # of add's 200 prompts; HELD_OUT_SHARE 0.25


def write_set(tmp_path, **kw):
    p = tmp_path / "set.yaml"
    p.write_text(yaml.safe_dump({"name": "s", "kind": "sft", "train_examples": 50,
                                 "eval_examples": 10, **kw}))
    return p


def test_build_sft_set_mixes_sources_by_weight(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    path = REPO / "datasets_cfg" / "tiny_sft.yaml"
    art = X.get_example_set(path, store, log=lambda m: None)
    train = X.read_jsonl(art.local_path() / "train.jsonl")
    held = X.read_jsonl(art.local_path() / "eval.jsonl")
    assert len(train) == 400 and len(held) == 40
    assert sum(r["source"] == "faq" for r in train) == 40          # weight 0.1 of 400
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert all(r["completion"] for r in train)
    assert X.get_example_set(path, store).digest == art.digest     # reused, not rebuilt
    assert art.manifest["kind"] == "dataset" and art.manifest["sources"][0]["name"] == "tasks"


@pytest.mark.parametrize("rows, message", [
    ([{"question": "q"}], "missing field(s) ['answer']"),
    ([{"question": "  ", "answer": "a"}], "empty prompt"),
])
def test_bad_sft_rows(tmp_path, rows, message):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_set(tmp_path, sources=[{"name": "f", "type": "files", "paths": [str(f)],
                                         "prompt_field": "question",
                                         "completion_field": "answer"}])
    with pytest.raises(DataError, match=rf"d.jsonl:1: {message}".replace("[", r"\[")
                       .replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        X.build(X.load_example_set(path), tmp_path / "out")


@pytest.mark.parametrize("content, message", [
    (b'{"question": "caf\xe9", "answer": "a"}\n', r"d.jsonl:1: not UTF-8 text"),
    (b'{"question": "q", "answer": "a"}\n{"question": \n', r"d.jsonl:2: not valid JSON"),
    (b'{"question": 7, "answer": "a"}\n', r"d.jsonl:1: field 'question' must be text, got int 7"),
    (b'{"question": "q", "answer": ["a"]}\n', r"d.jsonl:1: field 'answer' must be text, got list"),
    (b'"just a string"\n', r"d.jsonl:1: each line must be a JSON object, got str"),
])
def test_bad_file_contents_name_the_file_and_line(tmp_path, content, message):
    f = tmp_path / "d.jsonl"
    f.write_bytes(content)
    path = write_set(tmp_path, sources=[{"name": "f", "type": "files", "paths": [str(f)],
                                         "prompt_field": "question",
                                         "completion_field": "answer"}])
    with pytest.raises(DataError, match=message):
        X.build(X.load_example_set(path), tmp_path / "out")


def test_a_margin_that_is_not_a_number_is_refused(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "m": "big"}) + "\n")
    path = write_set(tmp_path, kind="preference", sources=[
        {"name": "f", "type": "files", "paths": [str(f)], "margin_field": "m"}])
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'm' must be a number, got str \"big\""):
        X.build(X.load_example_set(path), tmp_path / "out")


def test_chosen_identical_to_rejected(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same "}) + "\n")
    path = write_set(tmp_path, kind="preference", sources=[
        {"name": "f", "type": "files", "paths": [str(f)]}])
    with pytest.raises(DataError, match="p.jsonl:1: chosen is identical to rejected"):
        X.build(X.load_example_set(path), tmp_path / "out")


def test_too_few_examples_and_config_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    path = write_set(tmp_path, sources=[{"name": "f", "type": "files", "paths": [str(f)]}])
    with pytest.raises(DataError, match=r"source f: has 1 examples \(0 more dropped by its filters\); needs 50"):
        X.build(X.load_example_set(path), tmp_path / "out")
    bad = write_set(tmp_path, sources=[{"name": "t", "type": "tasks", "families": ["chess"]}])
    with pytest.raises(ConfigError, match="unknown task families"):
        X.load_example_set(bad)
    with pytest.raises(ConfigError, match="dataset config not found"):
        X.load_example_set(tmp_path / "none.yaml")


def test_near_misses_cover_several_kinds_and_are_always_wrong():
    exs = tasks.generate(["sort", "larger", "reverse"], 300, seed=5)
    for e in exs:
        assert e["wrong"] != e["answer"]
    sort = [e for e in exs if e["task"] == "sort"]
    in_order = [e for e in sort if e["wrong"].split() == sorted(e["wrong"].split(), key=int)]
    assert 0 < len(in_order) < len(sort)          # both unsorted and sorted-but-wrong negatives
    larger = [e for e in exs if e["task"] == "larger"]
    made_up = [e for e in larger if e["wrong"] not in e["prompt"]]
    assert 0 < len(made_up) < len(larger)


def test_a_recurring_prompt_gets_different_negatives():
    # With one fixed negative per prompt the RM saw 540 sort pairs in all, and PPO found the
    # digit substitutions it was never shown.
    exs = tasks.generate(["sort"], 2000, seed=3)
    wrongs = {}
    for e in exs:
        wrongs.setdefault(e["prompt"], set()).add(e["wrong"])
    recurring = [w for w in wrongs.values() if len(w) > 1]
    assert len(recurring) > 0.8 * len(wrongs)


def test_accuracy_change_tells_noise_from_change():
    assert tasks.accuracy_change(0.847, 0.833, 150) == (pytest.approx(-0.014), False)
    assert tasks.accuracy_change(0.377, 0.570, 600) == (pytest.approx(0.193), True)
    assert tasks.accuracy_change(0.5, 0.5, 10)[1] is False
    assert tasks.accuracy_change(0.0, 1.0, 1)[1] is True       # no spread: any change is real


def test_open_prompt_set_from_files(tmp_path):
    # Prompts have no answer, so the answer-length filter must not drop them (it once did all).
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n"
                         for w in ("cats", "rain", "tea", "maps", "jazz", "rust")))
    path = write_set(tmp_path, kind="prompts", train_examples=4, eval_examples=2,
                     sources=[{"name": "f", "type": "files", "paths": [str(f)]}])
    X.build(X.load_example_set(path), tmp_path / "out")
    train, held = (X.read_jsonl(tmp_path / "out" / n) for n in ("train.jsonl", "eval.jsonl"))
    assert len(train) == 4 and len(held) == 2
    assert all("answer" not in r for r in train + held)


def test_more_held_out_prompts_than_a_family_has(tmp_path):
    path = write_set(tmp_path, kind="prompts", eval_examples=200,
                     sources=[{"name": "t", "type": "tasks", "families": ["label"]}])
    with pytest.raises(DataError, match=r"set.yaml: source t: cannot draw 200 distinct held-out "
                                        r"prompts of label: .*label 153.*fewer eval_examples"):
        X.get_example_set(path, ArtifactStore(tmp_path / "store"))
