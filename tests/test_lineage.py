import json

from stages import lineage
from tests.conftest import put


def test_tree_reaches_raw_sources_through_every_generation(pipeline_store):
    store, a = pipeline_store
    g = lineage.build(store, "demo-ppo")
    assert g.root == a["ppo"].digest
    kinds = {n.kind for n in g.nodes.values()}
    assert kinds == {"model", "dataset", "tokenizer", "corpus", "source"}
    # ppo -> actor sft -> pretrain -> dataset -> tokenizer -> corpus -> source: 7 generations
    text = lineage.render_text(g)
    lines = text.splitlines()
    assert lines[0].startswith("model demo-ppo@1") and "kl.coef=0.05" in lines[0]
    for label in ("actor: model demo-sft@1", "reward: model demo-rm@1", "demo-pretrain@1",
                  "dataset demo-packed@1", "tokenizer demo-tokenizer@1", "corpus demo-corpus@1",
                  "books: source shakespeare"):
        assert label in text, label
    assert "(ancestors shown above)" in text  # the SFT model is reached twice, expanded once
    # the source sits five generations below the PPO model: ppo/actor/model/dataset/corpus
    source = next(l for l in lines if "source shakespeare" in l)
    assert len(source) - len(source.lstrip("│ ├└─")) == 4 * 5


def test_json_mermaid_dot(pipeline_store):
    store, a = pipeline_store
    g = lineage.build(store, a["ppo"].digest[:8])
    data = json.loads(lineage.render_json(g))
    ids = {n["id"] for n in data["nodes"]}
    assert a["corpus"].digest in ids and "source:shakespeare" in ids
    assert {"child": a["ppo"].digest, "parent": a["rm"].digest, "role": "reward"} in data["edges"]
    ppo = next(n for n in data["nodes"] if n["id"] == a["ppo"].digest)
    assert ppo["metrics"] == {"rl/reward": 1.2, "rl/kl": 2.0} and ppo["stage"] == "ppo"
    mermaid = lineage.render_mermaid(g)
    assert mermaid.startswith("flowchart BT") and "-->|actor|" in mermaid
    assert mermaid.count("-->") == len(g.edges)        # one source: nothing to fold
    assert "books<br/>1 source(s): shakespeare" in mermaid and ":::model" in mermaid
    dot = lineage.render_dot(g)
    assert dot.startswith("digraph lineage") and dot.count("->") == len(g.edges)


def test_diff_names_differing_ancestors_and_config(pipeline_store, tmp_path):
    store, a = pipeline_store
    # a second SFT with another learning rate, then a PPO on it with the same reward model
    sft2 = put(store, tmp_path, {"model.safetensors": b"w2b"}, kind="model", stage="sft",
               name="demo-sft", parents=[{"role": "model", "digest": a["pretrain"].digest}],
               config={"optim": {"lr": 1e-4}})
    put(store, tmp_path, {"model.safetensors": b"w4b"}, kind="model", stage="ppo",
        name="demo-ppo", parents=[{"role": "actor", "digest": sft2.digest},
                                  {"role": "reward", "digest": a["rm"].digest}],
        config={"kl": {"coef": 0.1}})
    d = lineage.diff(store, "demo-ppo@1", "demo-ppo@2")
    rows = {r["path"]: r for r in d["rows"]}
    assert rows["(root)"]["status"] == "differs"
    assert rows["(root)"]["config"] == {"kl.coef": [0.05, 0.1]}
    assert rows["actor"]["config"] == {"optim.lr": [5e-5, 1e-4]}
    assert rows["reward"]["status"] == "same" and rows["actor/model"]["status"] == "same"
    text = lineage.render_diff(d, lineage.labels(store))
    assert "≠ actor: demo-sft@1 -> demo-sft@2" in text and "optim.lr: 5e-05 -> 0.0001" in text


def test_mermaid_folds_many_sources_into_one_node_per_domain(store, tmp_path):
    # Before: 25 raw sources of the demo corpus were 25 leaves, an unreadable thumbnail.
    from tests.conftest import put
    sources = [{"name": f"src{i:02d}", "domain": ("books", "code", "web")[i % 3],
                "version": "1"} for i in range(25)]
    corpus = put(store, tmp_path, {"a.jsonl": "{}"}, kind="corpus", name="c",
                 extra={"sources": sources})
    model = put(store, tmp_path, {"m.safetensors": b"w"}, kind="model", name="m",
                parents=[{"role": "corpus", "digest": corpus.digest}])
    mermaid = lineage.render_mermaid(lineage.build(store, "m"))
    assert mermaid.count("source(s)") == 3 and "books<br/>9 source(s): src00, src03, src06 +6" \
        in mermaid
    assert mermaid.count("-->") == 1 + 3           # model <- corpus, corpus <- 3 domains
    assert "src24" not in mermaid and model.short in mermaid
