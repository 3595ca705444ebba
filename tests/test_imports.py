"""`alignflow import`: a pretrained model becomes a model artifact and the root of its lineage.

Real tiny models saved by transformers stand in for downloaded ones; no test needs the network.
"""

import json
import subprocess
import sys

import pytest
import torch

from stages import lineage
from stages.artifacts import ArtifactStore, NotFound
from stages.config import PretrainConfig
from stages.configfile import ConfigError
from stages.data import CHAT_EOS
from stages.imports import import_model
from stages.model import llama_config, parent_model
from tests.conftest import REPO

TEXT = ["the quick brown fox jumps over the lazy dog " * 4, "hello world, a model to import"]


def base_model(path, chat=False, pickle=False):
    """A base LLaMA as a hub directory holds it: one EOS that is also the BOS (GPT-2 style), no
    pad, no chat template, no ChatML tokens (unless `chat`: then a template ending turns with
    its EOS, as an instruct model has)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] + (["<|im_start|>", "<|im_end|>"] if chat else [])
    t.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>")
    if chat:
        tok.eos_token = "<|im_end|>"
        tok.pad_token = "<|endoftext|>"
        tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                             "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config("tiny", len(tok), tok))
    if pickle:   # an older checkpoint: transformers 5 no longer writes these itself
        path.mkdir(parents=True)
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def test_a_base_model_gets_chatml_and_a_record_of_what_changed(store, tmp_path):
    base_model(tmp_path / "base")
    art = import_model(str(tmp_path / "base"), "base", store)
    m = art.manifest
    assert (m["kind"], m["stage"], m["name"]) == ("model", "import", "base")
    assert m["source"]["kind"] == "directory"
    assert m["chat"]["chat_template"] == "ChatML added"
    assert m["chat"]["added_tokens"] == ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    rows = m["chat"]["embeddings"]
    assert rows[1] == rows[0] + 3
    facts = m["model_facts"]
    assert facts["architecture"] == "LlamaForCausalLM" and facts["vocab_size"] == rows[1]
    assert facts["tokenizer"]["eos"] == CHAT_EOS and facts["chat_template"]
    # Every file read is in the lineage, with its hash.
    assert {s["name"] for s in m["sources"]} >= {"model.safetensors", "config.json",
                                                 "tokenizer.json"}
    # The artifact loads with plain transformers and stops at the turn's end.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(art.local_path())
    model = AutoModelForCausalLM.from_pretrained(art.local_path())
    assert tok.eos_token == CHAT_EOS and tok.pad_token != tok.eos_token
    assert model.config.eos_token_id == tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "yo"}], tokenize=False)
    assert "yo<|im_end|>" in text
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_a_model_with_its_own_chat_template_keeps_it(store, tmp_path):
    base_model(tmp_path / "instruct", chat=True)
    m = import_model(str(tmp_path / "instruct"), "instruct", store).manifest
    assert m["chat"]["chat_template"] == "model's own"
    assert m["chat"]["added_tokens"] == [] and "embeddings" not in m["chat"]


def test_the_same_bytes_give_the_same_digest(tmp_path):
    base_model(tmp_path / "base")
    a = import_model(str(tmp_path / "base"), "base", ArtifactStore(tmp_path / "s1"))
    b = import_model(str(tmp_path / "base"), "base", ArtifactStore(tmp_path / "s2"))
    assert a.digest == b.digest
    # Again into one store: reused, one version; under a second name: tagged, not rebuilt.
    store = ArtifactStore(tmp_path / "s1")
    again = import_model(str(tmp_path / "base"), "other", store)
    assert again.digest == a.digest and len(store.versions("base")) == 1
    assert store.resolve("other") == a.digest


def test_a_pickled_checkpoint_is_stored_as_safetensors(store, tmp_path):
    model = base_model(tmp_path / "bin", pickle=True)
    assert (tmp_path / "bin" / "pytorch_model.bin").exists()
    art = import_model(str(tmp_path / "bin"), "from-bin", store)
    files = set(art.manifest["files"])
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    from safetensors.torch import load_file
    got = load_file(art.local_path() / "model.safetensors")
    want = model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], want)


def write_gguf(model, tok_dir, path):
    """`model` as llama.cpp's converter writes a LLaMA: its tensor names, q/k rows permuted for
    its rotary layout, the byte-level BPE vocabulary and merges as tokenizer.ggml.*."""
    import gguf
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_license("apache-2.0")
    t = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = sorted(t["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {a["id"]: a["content"] for a in t["added_tokens"]}
    tokens = [added.get(i, tok) for tok, i in vocab]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in t["model"]["merges"]])
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|endoftext|>"))

    def permute(x, heads):
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2) \
            .reshape(x.shape)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, ours in names.items():
            x = sd[f"model.layers.{i}.{hf}.weight"]
            if ours == "attn_q":
                x = permute(x, cfg.num_attention_heads)
            elif ours == "attn_k":
                x = permute(x, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{ours}.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_written_by_the_gguf_package_imports_as_the_same_model(store, tmp_path):
    model = base_model(tmp_path / "hf")
    write_gguf(model, tmp_path / "hf", tmp_path / "tiny.gguf")
    art = import_model(str(tmp_path / "tiny.gguf"), "from-gguf", store)
    m = art.manifest
    assert m["source"]["kind"] == "gguf" and m["model_facts"]["architecture"] == "LlamaForCausalLM"
    assert [s["name"] for s in m["sources"]] == ["tiny.gguf"]
    assert m["source"]["license"] == "apache-2.0"   # general.license of the file
    # The dequantized copy computes what the model written into the file computes.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    got = AutoModelForCausalLM.from_pretrained(art.local_path())
    tok = AutoTokenizer.from_pretrained(art.local_path())
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    assert ids.shape[1] > 1 and ids.max() < model.config.vocab_size
    with torch.no_grad():
        want = model(ids).logits
        have = got(ids).logits[..., :want.shape[-1]]
    assert torch.allclose(want, have, atol=1e-4), (want - have).abs().max()
    # The same file again: the same digest.
    assert import_model(str(tmp_path / "tiny.gguf"), "from-gguf", store).digest == art.digest


def test_a_bare_directory_as_a_reference_says_to_import_it(store, tmp_path):
    base_model(tmp_path / "base")
    with pytest.raises(NotFound, match="alignflow import .*base --name NAME"):
        parent_model(store, str(tmp_path / "base"), "parent")


def test_continued_pretraining_drops_the_settings_it_ignores():
    cfg = PretrainConfig.model_validate({
        "run": {"name": "x"}, "model": {"preset": "demo", "init_from": "smollm2"},
        "data": {"mixture": "datasets_cfg/tiny_mixture.yaml", "vocab_size": 8192}})
    assert cfg.model.preset is None and cfg.data.vocab_size is None
    with pytest.raises(ValueError, match="max_position_embeddings cannot change"):
        PretrainConfig.model_validate({
            "run": {"name": "x"}, "model": {"init_from": "m", "max_position_embeddings": 64},
            "data": {"mixture": "datasets_cfg/tiny_mixture.yaml"}})


def test_lineage_shows_what_was_imported(store, tmp_path):
    base_model(tmp_path / "base")
    import_model(str(tmp_path / "base"), "base", store)
    text = lineage.render_text(lineage.build(store, "base"))
    assert "model=LlamaForCausalLM/" in text and "stage=import" in text
    assert "source model.safetensors" in text and "sha256=" in text


def test_the_cli_imports_and_refuses_what_it_cannot(tmp_path):
    base_model(tmp_path / "base")
    cli = [sys.executable, "-m", "flows.cli", "--store", str(tmp_path / "s"), "import"]
    ok = subprocess.run([*cli, str(tmp_path / "base"), "--name", "base"], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "LlamaForCausalLM" in ok.stderr
    missing = subprocess.run([*cli, str(tmp_path / "nope"), "--name", "x"], cwd=REPO,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr
    assert "Traceback" not in missing.stderr
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    bad = subprocess.run([*cli, str(not_a_model), "--name", "x"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no config.json" in bad.stderr


def test_a_hub_id_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HuggingFaceTB/SmolLM2-135M@main: cannot download"):
        import_model("HuggingFaceTB/SmolLM2-135M", "x", ArtifactStore(tmp_path / "s"))


def test_a_hub_id_is_pinned_to_its_commit(store, tmp_path, monkeypatch):
    """The Hub path without the network: huggingface_hub's two calls answered from a local
    snapshot. What is recorded is the commit the revision resolved to, and the card's license."""
    import huggingface_hub
    from types import SimpleNamespace
    base_model(tmp_path / "snapshot")
    asked = {}

    def model_info(self, repo, revision=None):
        asked["info"] = (repo, revision)
        return SimpleNamespace(sha="c0ffee" * 6 + "abcd", card_data={"license": "apache-2.0"})

    def snapshot_download(repo, revision=None, allow_patterns=None):
        asked["download"] = (repo, revision)
        return str(tmp_path / "snapshot")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    art = import_model("org/tiny@v1", "hub-tiny", store)
    src = art.manifest["source"]
    assert asked == {"info": ("org/tiny", "v1"), "download": ("org/tiny", "c0ffee" * 6 + "abcd")}
    assert (src["kind"], src["id"], src["revision"], src["commit"], src["license"]) == \
        ("hub", "org/tiny", "v1", "c0ffee" * 6 + "abcd", "apache-2.0")
    assert {s["name"] for s in art.manifest["sources"]} >= {"model.safetensors", "config.json"}


def test_the_shipped_recipe_is_valid():
    from stages.configfile import load_config
    from stages.imports import ImportRecipe
    r = load_config(ImportRecipe, REPO / "datasets_cfg/smollm2_import.yaml", what="import recipe")
    assert r.file.endswith(".gguf") and r.fetch.sha256
    assert json.dumps(r.model_dump())


def test_the_smollm2_preset_imports_first_and_starts_at_sft():
    from flows.params import PRESETS
    from flows.pipeline import validate
    p = PRESETS["smollm2"]
    assert p.stages() == ["sft", "rm", "ppo"] and p.model.endswith("smollm2_import.yaml")
    validate(p)   # every config of the preset loads, with its data YAML
