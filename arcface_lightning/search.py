"""Search: the k gallery items nearest each query by cosine similarity (top-k retrieval).

    python -m arcface_lightning.search gallery=gallery.npz query=queries.npz k=5 output=hits.csv
    python -m arcface_lightning.search gallery=gallery.npz query=photos/ k=5   # images, embedded with the model
    python -m arcface_lightning.search gallery=gallery.npz query=list.csv model=export/model.onnx index=faiss

The gallery is an embeddings file of arcface_lightning.embed. A query is another one, or an image, a folder of
images (or of class folders) or a CSV list, embedded with `model` (null: the model recorded in the gallery file;
either way it must have the gallery's preprocessing contract). Per query: its k best gallery items, best first,
printed for the first `print_queries` queries and, with `output=`, all written to a CSV (query, rank, gallery, label,
score). Where queries and gallery both have labels, top-1 accuracy is printed too. `query=` the gallery file itself
leaves each item's own entry out (leave-one-out), so that top-1 accuracy is evaluate's precision@1. k larger than
the gallery is clamped to its size, with a warning. (In conf/search.yaml the model's key is `query_model`: conf/model/
is a config group, so Hydra would read `model=` as a choice of it; cli() passes `model=` on as `query_model=`.)

No silent wrong answers: a query file or a model from another model than the gallery's (told apart by the SHA-256 of
their weights in the contract; a file written before that records none, said in a warning), rows that are not unit
length (their dot products are no cosines), malformed arrays, and an `output=` that is one of the inputs or cannot
be written are refused in one line before the search. The CSV is written aside and renamed.

`model=` may be a TorchScript file (.pt): loading one runs the code it holds, so give only files you trust.

Embeddings files, and query images with an .onnx or .pt model, are searched without importing Lightning (nor, for
PNG images, torchvision); a .ckpt as the model brings Lightning in (seconds more at start).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from arcface_lightning.core.config import ConfigError
from arcface_lightning.core.runs import entry_point, start
from arcface_lightning.core.writing import check_output, written_aside
from arcface_lightning.data import DataError
from arcface_lightning.serving.contract import Embeddings, read_embeddings
from arcface_lightning.serving.inference import embed_files, index_inputs, load_model

log = logging.getLogger(__name__)


def select(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row (score, column), best first; equal scores: the lower column first, exactly."""
    rows, n = scores.shape
    if k < n:
        kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]  # each row's k-th best score
        take = scores >= kth
        if (take.sum(1) > k).any():  # ties across the k-th place: of the equal ones, the first columns
            greater = scores > kth
            equal = take & ~greater
            take = greater | (equal & (equal.cumsum(1) <= k - greater.sum(1, keepdims=True)))
        columns = np.nonzero(take)[1].reshape(rows, k)  # ascending within each row
    else:
        columns = np.broadcast_to(np.arange(n), (rows, n))
    values = np.take_along_axis(scores, columns, 1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(values, order, 1), np.take_along_axis(columns, order, 1)


def top_k(
    queries: np.ndarray, gallery: np.ndarray, k: int, chunk_size: int = 4096, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of unit rows: (scores float32 (Q, k), gallery indices int64 (Q, k)), best first, equal
    scores in gallery order. Chunked over queries and gallery with a running merge: memory chunk_size² + Q·k, never
    Q·G. k is clamped to the gallery size. `exclude_self`: the queries are the gallery (row i never finds item i).
    NumPy (its BLAS for the products): no torch to import for a search of embeddings files."""
    q = np.asarray(queries, dtype=np.float32)
    g = np.asarray(gallery, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"queries {q.shape} and gallery {g.shape} are not (N, D) of one size D")
    if not (np.isfinite(q).all() and np.isfinite(g).all()):
        raise ValueError("the embeddings hold NaN or infinite values")
    k = min(k, len(g) - int(exclude_self))
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k={k} and chunk_size={chunk_size} must be ≥ 1 (and the gallery non-empty)")
    scores, indices = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
    for qs in range(0, len(q), chunk_size):
        block = q[qs : qs + chunk_size]
        best_s, best_i = np.empty((len(block), 0), np.float32), np.empty((len(block), 0), np.int64)
        for gs in range(0, len(g), chunk_size):
            similarity = block @ g[gs : gs + chunk_size].T
            if exclude_self:  # query qs + r is gallery item gs + c where c - r = qs - gs
                r = np.arange(max(0, gs - qs), min(len(block), gs - qs + similarity.shape[1]))
                similarity[r, r + qs - gs] = -np.inf
            s, i = select(similarity, min(k, similarity.shape[1]))
            # earlier chunks' indices are all lower: a stable sort of [best, new] keeps equal scores in gallery order
            merged_s, merged_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + gs], 1)
            order = np.argsort(-merged_s, axis=1, kind="stable")[:, :k]
            best_s, best_i = np.take_along_axis(merged_s, order, 1), np.take_along_axis(merged_i, order, 1)
        scores[qs : qs + len(block)], indices[qs : qs + len(block)] = best_s, best_i
    return scores, indices


def faiss_top_k(
    queries: np.ndarray, gallery: np.ndarray, k: int, chunk_size: int = 4096, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """top_k through faiss.IndexFlatIP: also exact (inner product of unit rows = cosine), and faster on large
    galleries (≳ 10⁵ items; BLAS plus faiss's own heaps); order among equal scores is faiss's. Approximate indexes
    (IVF, HNSW) trade recall for speed on still larger galleries: build one with faiss directly. Needs faiss-cpu."""
    try:
        import faiss
    except ImportError:
        raise ConfigError('index=faiss needs faiss: pip install "arcface-lightning[faiss]"') from None
    g = np.ascontiguousarray(gallery, dtype=np.float32)
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    k = min(k, len(g) - int(exclude_self))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    # exclude_self: one more, then each row's own item (or, where it is not among them, its last) dropped
    parts = [index.search(q[s : s + chunk_size], k + int(exclude_self)) for s in range(0, len(q), chunk_size)]
    scores, indices = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]).astype(np.int64)
    if exclude_self:
        keep = indices != np.arange(len(q))[:, None]
        keep[keep.all(1), -1] = False
        scores, indices = scores[keep].reshape(len(q), k), indices[keep].reshape(len(q), k)
    return scores, indices


def check_settings(cfg: DictConfig) -> None:
    for key in ("k", "chunk_size", "batch_size", "print_queries"):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "print_queries" else 1):
            raise ConfigError(f"{key}={value!r} is invalid; allowed: an integer ≥ {int(key != 'print_queries')}")
    if cfg.index not in ("exact", "faiss"):
        raise ConfigError(f"index={cfg.index!r} is invalid; allowed: exact, faiss")
    if cfg.output:
        check_output(cfg.output)


def check_output_is_new(cfg: DictConfig, gallery: Embeddings) -> None:
    """The hits must not replace an input: the gallery, the query (a file or a list), or the model that embeds it."""
    inputs = {"gallery": cfg.gallery, "query": cfg.query, "model": cfg.query_model}
    named = {f"{key}={value}": value for key, value in inputs.items() if value is not None}
    named.setdefault(f"the model of gallery={cfg.gallery}", gallery.model)
    for what, value in named.items():
        if same_file(cfg.output, value):
            raise ConfigError(f"output={cfg.output} is {what}; give another file name for the hits")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (through links, `..` or a second hard link)."""
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def embed_query(cfg: DictConfig, gallery: Embeddings) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(embeddings, labels, sources, class names) of the query: an embeddings file, or images embedded here."""
    what = f"gallery={cfg.gallery}"
    if str(cfg.query).endswith(".npz"):
        query = read_embeddings(cfg.query, "query")
        if not same_file(cfg.query, cfg.gallery):  # leave-one-out: one file, one model
            gallery.contract.check_same(query.contract, what, f"query={cfg.query}")
            gallery.contract.check_same_model(query.contract, what, f"query={cfg.query}")
        return query.embeddings, query.labels, [str(s) for s in query.sources], query.classes
    paths, labels, classes = index_inputs(cfg.query, "query")
    model = cfg.query_model or gallery.model
    embed, contract = load_model(model, key="model" if cfg.query_model else "the gallery's model")
    gallery.contract.check_same(contract, what, f"model={model}")
    gallery.contract.check_same_model(contract, what, f"model={model}")
    return embed_files(embed, contract, paths, cfg.batch_size), np.asarray(labels), paths, classes or []


def names(labels: np.ndarray, classes: list[str]) -> list[str]:
    """Each label's class name where known, else its id; "" for -1 (unknown)."""
    return [(classes[i] if 0 <= i < len(classes) else str(i)) if i >= 0 else "" for i in labels.tolist()]


def search(cfg: DictConfig) -> dict[str, Any]:
    start(cfg)
    check_settings(cfg)
    gallery = read_embeddings(cfg.gallery, "gallery")
    if cfg.output:
        check_output_is_new(cfg, gallery)
    queries, query_labels, sources, query_classes = embed_query(cfg, gallery)
    if queries.shape[1] != gallery.embeddings.shape[1]:  # files whose arrays contradict their contracts
        raise DataError(f"query={cfg.query} and gallery={cfg.gallery} hold embeddings of different sizes")
    exclude = Path(str(cfg.query)).resolve() == Path(cfg.gallery).resolve()  # leave-one-out
    k = min(cfg.k, len(gallery.embeddings) - int(exclude))
    if k < 1:
        raise DataError(f"gallery={cfg.gallery} has no {'other ' if exclude else ''}item to find")
    if k < cfg.k:
        log.warning("k=%d is more than the gallery's %d items to rank: k=%d", cfg.k, k, k)
    find = faiss_top_k if cfg.index == "faiss" else top_k
    try:
        scores, indices = find(queries, gallery.embeddings, k, cfg.chunk_size, exclude_self=exclude)
    except ValueError as error:  # NaN or infinite values in a file (a ConfigError: faiss missing, said as it is)
        if isinstance(error, ConfigError):
            raise
        raise DataError(f"query={cfg.query}, gallery={cfg.gallery}: {error}") from None
    gallery_names, query_names = names(gallery.labels, gallery.classes), names(query_labels, query_classes)

    def hits(q: int) -> list[tuple[str, int, str, str, str]]:  # the CSV rows of query q
        found = enumerate(indices[q].tolist())
        return [(sources[q], r + 1, str(gallery.sources[j]), gallery_names[j], f"{scores[q, r]:.6f}") for r, j in found]

    for q in range(min(cfg.print_queries, len(queries))):
        print(f"query {sources[q]}" + (f" [{query_names[q]}]" if query_names[q] else ""))
        for _, rank, item, label, score in hits(q):
            print(f"  {rank:>3}  {score:>9}  {item}  {label}")
    if len(queries) > cfg.print_queries:
        print(f"... and {len(queries) - cfg.print_queries} more queries" + (f" in {cfg.output}" if cfg.output else ""))
    result: dict[str, Any] = dict(queries=len(queries), gallery_size=len(gallery.embeddings), k=k, index=cfg.index)
    known = query_labels >= 0
    if known.any() and (gallery.labels >= 0).any():
        if query_classes and gallery.classes:  # by class name: two folders may number their classes differently
            correct = [query_names[q] == gallery_names[indices[q, 0]] for q in np.flatnonzero(known)]
        else:
            correct = list(query_labels[known] == gallery.labels[indices[known, 0]])
        result["top1_accuracy"] = float(np.mean(correct))
        print(f"top-1 accuracy: {result['top1_accuracy']:.4f} ({len(correct)} labelled queries)")
    if cfg.output:
        result["output"] = str(write_csv(Path(cfg.output), (row for q in range(len(queries)) for row in hits(q))))
        print(f"wrote {cfg.output}")
    return result


def write_csv(path: Path, rows: Iterable[tuple]) -> Path:
    """query, rank, gallery, label, score: written aside and renamed, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_aside(path) as partial, partial.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("query", "rank", "gallery", "label", "score"))
        writer.writerows(rows)
    return path


def model_as_query_model(argv: list[str]) -> list[str]:
    """`model=` on the command line is `query_model` in conf/search.yaml (conf/model/ is a config group)."""
    return [re.sub(r"^\+{0,2}model=", "query_model=", a) for a in argv]


main, cli = entry_point("search", search, rewrite=model_as_query_model)


if __name__ == "__main__":
    cli()
