"""Lineage: the graph of commits, the commits they came from, and the runs that used or made them.

Nodes are commits (``dataset@id``), runs and restores. Edges, pointing from a thing to what it
came from:

* ``parent``        commit -> its previous version
* ``derived-from``  commit -> an input commit (``push --derived-from``, ``run --snapshot``),
                    labelled with the transform when one was given
* ``produced-by``   commit -> the run that produced it (``run --snapshot``)
* ``used``          run -> a commit it read (``resolve``, ``use``, ``run --use``)
* ``restored-from`` restore (a working copy) -> the commit it was restored from

``upstream`` walks edges forward (where did this come from), ``downstream`` backward (what
came from this). ``walk`` is pure over a ``Graph``; ``build`` reads the catalog.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .catalog import Catalog
    from .context import Context


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    kind: str
    label: str | None = None


@dataclass
class Graph:
    nodes: dict[str, dict] = field(default_factory=dict)  # id -> {"kind": ..., ...}
    edges: list[Edge] = field(default_factory=list)

    def out(self, node: str) -> list[Edge]:
        return [e for e in self.edges if e.src == node]

    def into(self, node: str) -> list[Edge]:
        return [e for e in self.edges if e.dst == node]


def build(catalog: Catalog) -> Graph:
    """The whole lineage graph known to the catalog."""
    g = Graph()
    for cid, dataset, parents, derived, transform, created, author in catalog.commit_edges():
        node = f"commit:{cid}"
        g.nodes[node] = {"kind": "commit", "dataset": dataset, "commit": cid, "created": created, "author": author}
        for p in json.loads(parents):
            g.edges.append(Edge(node, f"commit:{p}", "parent"))
        for d in json.loads(derived or "[]"):
            g.edges.append(Edge(node, f"commit:{d}", "derived-from", transform))
    for t in catalog.tombstones():
        g.nodes[f"commit:{t.commit}"] = {"kind": "commit", "dataset": t.dataset, "commit": t.commit, "purged": t.purged, "reason": t.reason, "by": t.purged_by}
    for rid, user, host, status, started, command in catalog.runs():
        g.nodes[f"run:{rid}"] = {"kind": "run", "run": rid, "user": user, "host": host, "status": status, "started": started, "command": command}
    for rid, dataset, cid, ref, _site in catalog.run_inputs():
        g.nodes.setdefault(f"run:{rid}", {"kind": "run", "run": rid})
        g.edges.append(Edge(f"run:{rid}", f"commit:{cid}", "used", f"{dataset}@{ref}" if ref else None))
    for rid, _dataset, cid in catalog.run_outputs():
        g.nodes.setdefault(f"run:{rid}", {"kind": "run", "run": rid})
        g.edges.append(Edge(f"commit:{cid}", f"run:{rid}", "produced-by"))
    for i, (cid, dataset, path, host, user, when) in enumerate(catalog.restores()):
        node = f"restore:{i}"
        g.nodes[node] = {"kind": "restore", "path": path, "host": host, "user": user, "time": when, "dataset": dataset}
        g.edges.append(Edge(node, f"commit:{cid}", "restored-from"))
    for node in {e.dst for e in g.edges} - g.nodes.keys():
        g.nodes[node] = {"kind": node.split(":", 1)[0], "unknown": True}
    return g


def walk(g: Graph, start: str, *, up: bool = True, down: bool = True, depth: int | None = None) -> Graph:
    """The subgraph reachable from ``start`` upstream and/or downstream, within ``depth`` hops."""
    sub = Graph()
    sub.nodes[start] = g.nodes.get(start, {"kind": "commit", "unknown": True})
    for forward, wanted in ((True, up), (False, down)):
        if not wanted:
            continue
        queue: deque[tuple[str, int]] = deque([(start, 0)])
        seen = {start}
        while queue:
            node, dist = queue.popleft()
            if depth is not None and dist >= depth:
                continue
            for edge in g.out(node) if forward else g.into(node):
                nxt = edge.dst if forward else edge.src
                if edge not in sub.edges:
                    sub.edges.append(edge)
                sub.nodes[nxt] = g.nodes.get(nxt, {"kind": "unknown"})
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append((nxt, dist + 1))
    return sub


def label(node_id: str, info: dict) -> str:
    kind = info.get("kind")
    if kind == "commit":
        text = f"{info.get('dataset', '?')}@{info.get('commit', node_id.split(':', 1)[1])[:12]}"
        return text + (" (purged)" if info.get("purged") else "")
    if kind == "run":
        status = info.get("status")
        return f"run {info.get('run', node_id.split(':', 1)[1])}" + (f" ({status})" if status else "")
    if kind == "restore":
        return f"restore to {info.get('path')} on {info.get('host')}"
    return node_id


def to_json(g: Graph) -> dict:
    return {
        "nodes": [{"id": n, **info} for n, info in g.nodes.items()],
        "edges": [{"from": e.src, "to": e.dst, "kind": e.kind, "label": e.label} for e in g.edges],
    }


def to_dot(g: Graph) -> str:
    lines = ["digraph lineage {", "  rankdir=BT;"]
    for n, info in g.nodes.items():
        shape = {"commit": "box", "run": "ellipse", "restore": "note"}.get(info.get("kind", ""), "plaintext")
        lines.append(f'  "{n}" [label="{label(n, info)}", shape={shape}];')
    for e in g.edges:
        text = e.kind + (f": {e.label}" if e.label else "")
        lines.append(f'  "{e.src}" -> "{e.dst}" [label="{text}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(g: Graph) -> str:
    ids = {n: f"n{i}" for i, n in enumerate(g.nodes)}
    lines = ["flowchart BT"]
    for n, info in g.nodes.items():
        lines.append(f'  {ids[n]}["{label(n, info)}"]')
    for e in g.edges:
        text = e.kind + (f": {e.label}" if e.label else "")
        lines.append(f"  {ids[e.src]} -->|{text}| {ids[e.dst]}")
    return "\n".join(lines) + "\n"


def to_text(g: Graph, start: str) -> str:
    lines = [label(start, g.nodes[start])]
    up = [e for e in g.edges if e.src == start]
    down = [e for e in g.edges if e.dst == start]
    if up:
        lines.append("upstream:")
        lines += _tree(g, start, forward=True, indent="  ", seen={start})
    if down:
        lines.append("downstream:")
        lines += _tree(g, start, forward=False, indent="  ", seen={start})
    return "\n".join(lines) + "\n"


def _tree(g: Graph, node: str, *, forward: bool, indent: str, seen: set[str]) -> list[str]:
    out = []
    for e in g.out(node) if forward else g.into(node):
        nxt = e.dst if forward else e.src
        text = e.kind + (f" [{e.label}]" if e.label else "")
        out.append(f"{indent}{text}: {label(nxt, g.nodes.get(nxt, {}))}")
        if nxt not in seen:
            seen.add(nxt)
            out += _tree(g, nxt, forward=forward, indent=indent + "  ", seen=seen)
    return out


def around(ctx: Context, ref: str, *, up: bool = True, down: bool = True, depth: int | None = None) -> Graph:
    """The lineage subgraph around the commit ``ref`` names (a purged commit still has its lineage)."""
    from .errors import RefNotFoundError
    from .index import purged, resolve_commit
    from .refs import Ref

    parsed = Ref.of(ref)
    try:
        commit_id = resolve_commit(ctx, parsed).id
    except RefNotFoundError:
        gone = purged(ctx, parsed)
        if gone is None:
            raise
        commit_id = gone.commit
    return walk(build(ctx.catalog), f"commit:{commit_id}", up=up, down=down, depth=depth)
