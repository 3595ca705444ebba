"""Lineage of an artifact: the graph from a model back to its raw data sources.

Built only from manifests in the store, so it is the same on every machine that sees the store.
Renders as a text tree, JSON (nodes and edges), Mermaid or Graphviz dot, and compares two graphs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from stages.artifacts import Artifact, ArtifactError, ArtifactStore
from stages.metrics import KEY_METRICS, canonical

# Config values worth a glance in a tree; the full config is in each manifest.
KEY_CONFIG = ("model.preset", "data.vocab_size", "data.seq_len", "data.total_tokens",
              "train.max_steps", "optim.lr", "lora.enabled", "kl.coef", "seed")


@dataclass
class Node:
    id: str                 # digest, or "source:<name>" for raw inputs outside the store
    kind: str
    label: str              # name@version where known, else the short digest
    stage: str | None = None
    created: str | None = None
    run_id: str | None = None
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    detail: dict = field(default_factory=dict)

    @property
    def short(self) -> str:
        return self.id[:12] if not self.id.startswith("source:") else self.id


@dataclass
class Graph:
    root: str
    nodes: dict[str, Node]
    edges: list[tuple[str, str, str]]   # (child, parent, role)
    direction: str = "ancestors"        # or "descendants": what was walked from the root

    def parents(self, node_id: str) -> list[tuple[str, str]]:
        return [(p, role) for c, p, role in self.edges if c == node_id]

    def related(self, node_id: str) -> list[tuple[str, str]]:
        """The next nodes away from the root: parents, or (used-by) children."""
        if self.direction == "ancestors":
            return self.parents(node_id)
        return [(c, role) for c, p, role in self.edges if p == node_id]


def build(store: ArtifactStore, ref: str) -> Graph:
    names = labels(store)
    root = store.get(ref, verify=False)
    nodes: dict[str, Node] = {}
    edges: list[tuple[str, str, str]] = []
    todo = [root]
    while todo:
        art = todo.pop()
        if art.digest in nodes:
            continue
        nodes[art.digest] = _node(art, names)
        for p in art.parents:
            edges.append((art.digest, p["digest"], p.get("role", "parent")))
            todo.append(store.get(p["digest"], verify=False))
        for src in art.manifest.get("sources", []):
            sid = f"source:{src['name']}"
            nodes.setdefault(sid, Node(sid, "source", src["name"], detail=src))
            edges.append((art.digest, sid, src.get("domain", "source")))
    return Graph(root.digest, nodes, edges)


def used_by(store: ArtifactStore, ref: str) -> Graph:
    """Everything trained from `ref`, directly or through others ("which PPO models were
    trained against rm@3?"), from the parents every manifest in the store records."""
    names = labels(store)
    root = store.get(ref, verify=False)
    children: dict[str, list[tuple[Artifact, str]]] = {}
    for digest in store.digests():
        try:
            art = store.get(digest, verify=False)
        except ArtifactError:
            continue                  # a damaged manifest is `alignflow verify`'s to report
        for p in art.parents:
            children.setdefault(p["digest"], []).append((art, p.get("role", "parent")))
    nodes, edges, todo = {root.digest: _node(root, names)}, [], [root.digest]
    while todo:
        parent = todo.pop()
        for child, role in children.get(parent, []):
            edges.append((child.digest, parent, role))
            if child.digest not in nodes:
                nodes[child.digest] = _node(child, names)
                todo.append(child.digest)
    return Graph(root.digest, nodes, edges, direction="descendants")


def labels(store: ArtifactStore) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in store.names():
        try:
            history = store.versions(name)
        except ArtifactError:
            continue                  # one damaged name must not hide every label
        for v in history:
            out.setdefault(v.digest, f"{name}@{v.version}")
    return out


def _node(art: Artifact, labels: dict[str, str]) -> Node:
    m = art.manifest
    flat = flatten(m.get("config", {}))
    config = {k: flat[k] for k in KEY_CONFIG if flat.get(k) is not None}
    facts = m.get("model_facts")
    if facts:   # what was trained, read from the weights, before what was asked for
        config = {"model": f"{facts['architecture']}/{facts['parameters'] / 1e6:.1f}M"
                           f"/{facts.get('dtype')}", **config}
    named = canonical(m.get("metrics", {}), m.get("stage"))
    metrics = {k: named[k] for k in KEY_METRICS if k in named}
    return Node(art.digest, m["kind"], labels.get(art.digest, art.short), m.get("stage"),
                m.get("created"), m.get("flow_run_id"), config, metrics)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --- renderers ----------------------------------------------------------------------------

def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _line(n: Node) -> str:
    head = f"{n.kind} {n.label}"
    if not n.id.startswith("source:"):
        head += f"  [{n.short}]"
    bits = [f"stage={n.stage}"] if n.stage else []
    bits += [f"{k}={_fmt(v)}" for k, v in {**n.config, **n.metrics}.items()]
    if n.id.startswith("source:"):
        bits += [f"{k}={v}" for k, v in n.detail.items() if k in ("version", "sha256", "via")]
    if n.run_id:
        bits.append(f"run={n.run_id[:8]}")
    if n.created:
        bits.append(n.created)
    return head + ("  " + " ".join(bits) if bits else "")


def render_text(g: Graph) -> str:
    lines = [_line(g.nodes[g.root])]
    seen = {g.root}

    def walk(node_id: str, prefix: str) -> None:
        kids = g.related(node_id)
        for i, (pid, role) in enumerate(kids):
            last = i == len(kids) - 1
            n = g.nodes[pid]
            again = pid in seen and g.related(pid)
            role = role if g.direction == "ancestors" else f"as {role} in"
            lines.append(f"{prefix}{'└── ' if last else '├── '}{role}: {_line(n)}"
                         + (f"  ({g.direction} shown above)" if again else ""))
            if not again:
                seen.add(pid)
                walk(pid, prefix + ("    " if last else "│   "))
    walk(g.root, "")
    return "\n".join(lines)


def render_json(g: Graph) -> str:
    return json.dumps({
        "root": g.root, "direction": g.direction,
        "nodes": [{"id": n.id, "kind": n.kind, "label": n.label, "stage": n.stage,
                   "created": n.created, "run_id": n.run_id, "config": n.config,
                   "metrics": n.metrics, **({"detail": n.detail} if n.detail else {})}
                  for n in g.nodes.values()],
        "edges": [{"child": c, "parent": p, "role": r} for c, p, r in g.edges],
    }, indent=2, default=str)


def _gid(node_id: str) -> str:
    return "n_" + "".join(ch if ch.isalnum() else "_" for ch in node_id[:40])


def render_mermaid(g: Graph) -> str:
    """A graph that reads at the width of a Prefect artifact page: raw sources folded into one
    node per domain (the demo has 25 of them), the model chain drawn bold."""
    out = ["flowchart BT", "  classDef model stroke-width:3px",
           "  classDef source stroke-dasharray:3 3"]
    domains: dict[str, set[str]] = {}
    for c, p, role in g.edges:
        if p.startswith("source:"):
            domains.setdefault(role, set()).add(g.nodes[p].label)
    for n in g.nodes.values():
        if n.id.startswith("source:"):
            continue
        text = f"{n.kind}<br/>{n.label}" + (f"<br/>{n.short}" if n.label != n.short else "")
        out.append(f'  {_gid(n.id)}["{_quote(text)}"]' + (":::model" if n.kind == "model"
                                                          else ""))
    for domain, names in sorted(domains.items()):
        shown = ", ".join(sorted(names)[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
        out.append(f'  {_gid("domain:" + domain)}["{_quote(domain)}<br/>{len(names)} '
                   f'source(s): {_quote(shown)}"]:::source')
    drawn = set()
    for c, p, role in g.edges:
        if p.startswith("source:"):
            edge = (_gid("domain:" + role), _gid(c))
            if edge not in drawn:
                drawn.add(edge)
                out.append(f"  {edge[0]} --> {edge[1]}")
        else:
            out.append(f"  {_gid(p)} -->|{role}| {_gid(c)}")
    return "\n".join(out)


def _quote(text: str) -> str:
    return text.replace('"', "'")


def render_dot(g: Graph) -> str:
    out = ["digraph lineage {", "  rankdir=BT;", "  node [shape=box, fontname=monospace];"]
    for n in g.nodes.values():
        label = f"{n.kind}\\n{n.label}".replace('"', "'")
        out.append(f'  {_gid(n.id)} [label="{label}"];')
    for c, p, role in g.edges:
        out.append(f'  {_gid(p)} -> {_gid(c)} [label="{role}"];')
    out.append("}")
    return "\n".join(out)


RENDERERS = {"text": render_text, "json": render_json, "mermaid": render_mermaid,
             "dot": render_dot}


# --- comparing two lineages ---------------------------------------------------------------

def _by_path(store: ArtifactStore, g: Graph) -> dict[str, str]:
    """Ancestors keyed by their role path from the root (e.g. 'actor/model/dataset')."""
    out, todo = {"": g.root}, [("", g.root)]
    while todo:
        path, nid = todo.pop()
        for pid, role in g.parents(nid):
            key = f"{path}/{role}" if path else role
            if key not in out:
                out[key] = pid
                todo.append((key, pid))
    return out


def diff(store: ArtifactStore, ref_a: str, ref_b: str) -> dict:
    """Which ancestors and which config values differ between two artifacts' lineages."""
    ga, gb = build(store, ref_a), build(store, ref_b)
    pa, pb = _by_path(store, ga), _by_path(store, gb)
    rows = []
    for path in sorted(set(pa) | set(pb), key=lambda p: (p.count("/"), p)):
        a, b = pa.get(path), pb.get(path)
        row = {"path": path or "(root)", "a": a, "b": b}
        if a and b and a == b:
            row["status"] = "same"
        elif a and b:
            row["status"] = "differs"
            row["config"] = _config_diff(store, ga.nodes[a], gb.nodes[b])
        else:
            row["status"] = "only in a" if a else "only in b"
        rows.append(row)
    return {"a": ga.root, "b": gb.root, "rows": rows}


def _config_diff(store: ArtifactStore, a: Node, b: Node) -> dict:
    if a.id.startswith("source:") or b.id.startswith("source:"):
        return {k: [a.detail.get(k), b.detail.get(k)] for k in set(a.detail) | set(b.detail)
                if a.detail.get(k) != b.detail.get(k)}
    fa = flatten(store.get(a.id, verify=False).manifest.get("config", {}))
    fb = flatten(store.get(b.id, verify=False).manifest.get("config", {}))
    return {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def render_diff(d: dict, labels: dict[str, str] | None = None) -> str:
    labels = labels or {}

    def name(x):
        return "-" if x is None else labels.get(x, x[:12] if not x.startswith("source:") else x)
    out = [f"a = {name(d['a'])}   b = {name(d['b'])}"]
    for r in d["rows"]:
        if r["status"] == "same":
            out.append(f"  = {r['path']}: {name(r['a'])}")
            continue
        out.append(f"  ≠ {r['path']}: {name(r['a'])} -> {name(r['b'])} ({r['status']})")
        for k, (va, vb) in r.get("config", {}).items():
            out.append(f"      {k}: {va!r} -> {vb!r}")
    return "\n".join(out)
