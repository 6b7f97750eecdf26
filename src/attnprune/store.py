"""The durable store of a run: every evaluated mask with its scores, one SQLite file.

Each evaluation is committed as soon as it completes (WAL journal, synchronous=FULL), so a
run killed at any moment loses nothing it finished, and a restarted run skips what is
already there. Evaluations are keyed by (mask, setting): the setting is a fingerprint of
what the evaluator measured (split, measure, sizes, seeds), so test-split numbers never mix
with validation numbers. The store also records the run's configuration; reopening it
with an incompatible configuration is refused.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from attnprune.errors import UserError
from attnprune.heads import HeadMask
from attnprune.results import BiasResult, PerplexityResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    mask_key TEXT NOT NULL,
    setting TEXT NOT NULL,
    split TEXT NOT NULL,
    source TEXT NOT NULL,
    n_pruned INTEGER NOT NULL,
    bias REAL NOT NULL,
    bias_lo REAL,
    bias_hi REAL,
    perplexity REAL,
    detail TEXT,
    seconds REAL,
    created TEXT NOT NULL,
    UNIQUE (mask_key, setting)
);
CREATE TABLE IF NOT EXISTS settings (setting TEXT PRIMARY KEY, description TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    mask_key TEXT NOT NULL,
    setting TEXT NOT NULL,
    label TEXT NOT NULL,
    PRIMARY KEY (mask_key, setting, label)
);
INSERT OR IGNORE INTO labels SELECT mask_key, setting, source FROM evaluations;
"""


def fingerprint(obj) -> str:
    """Stable 16-hex digest of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StoredEvaluation:
    """One row of the store."""

    mask: HeadMask
    split: str
    source: str
    bias: float
    bias_ci: tuple[float, float]
    perplexity: float
    detail: dict
    seconds: float
    created: str

    # the three parts of ``detail`` (as :meth:`Store.add` lays it out), read through these only
    @property
    def bias_result(self) -> BiasResult:
        """The bias measure's summary of this evaluation (buckets, weights, noise floor, statistics, ...)."""
        return BiasResult.of(self.detail["bias"])

    @property
    def prompt_scores(self) -> np.ndarray | None:
        """Per-prompt (or per-item) scores ``[n]`` of the bias measure, None when it keeps none."""
        scores = self.detail.get("prompt_scores")
        return None if scores is None else np.asarray(scores, dtype=float)

    @property
    def perplexity_result(self) -> PerplexityResult | None:
        """The perplexity measure's result (tokens, per-window NLL sums); None when measured without."""
        return PerplexityResult.of(self.detail.get("perplexity"))


class Store:
    """SQLite store of evaluations for one model layout (``n_layers x n_heads``)."""

    def __init__(self, path: str | Path, shape: tuple[int, int] | None, config: dict | None = None,
                 compatible_keys: Iterable[str] | None = None, row_heads: Sequence[int] | None = None):
        """Open or create the store at ``path``.

        ``shape`` may be None to open an existing store read-side (it is then read from the
        store, with ``row_heads``). ``row_heads`` are the heads of each row for a model whose
        layers differ (None: ``shape[1]`` in every row). ``config`` is recorded on creation. On reopening, the values under
        ``compatible_keys`` (default: all of ``config``) must be equal, else a
        :class:`~attnprune.errors.UserError` names the differences.
        """
        self.path = Path(path)
        if shape is None and not self.path.is_file():
            raise UserError(f"No store at {self.path}; run `attnprune sample` (or `repair`) with this --out first.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='shape'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path} is not a readable attnprune store ({exc}); use another --out directory.") from None
        if shape is None:
            if row is None:
                raise UserError(f"Store {self.path} holds no evaluations yet; run `attnprune sample` first.")
            shape = json.loads(row[0])
            stored = self.db.execute("SELECT value FROM meta WHERE key='row_heads'").fetchone()
            row_heads = json.loads(stored[0]) if stored else None
        self.shape = tuple(shape)
        self.row_heads = [int(h) for h in row_heads] if row_heads is not None else [self.shape[1]] * self.shape[0]
        self.check_config(config, compatible_keys)

    def check_config(self, config: dict | None, keys: Iterable[str] | None = None) -> None:
        """Refuse ``config`` when its values under ``keys`` (default: all) differ from the recorded ones.

        A store without a recorded configuration records ``config``.
        """
        row = self.db.execute("SELECT value FROM meta WHERE key='shape'").fetchone()
        if row and tuple(json.loads(row[0])) != self.shape:
            raise UserError(
                f"Store {self.path} holds masks for {json.loads(row[0])} heads, not {list(self.shape)}; "
                "use a new --out directory for this model."
            )
        heads = self.db.execute("SELECT value FROM meta WHERE key='row_heads'").fetchone()
        if row and (json.loads(heads[0]) if heads else [self.shape[1]] * self.shape[0]) != self.row_heads:
            raise UserError(f"Store {self.path} holds masks for another model's heads per layer; use a new --out "
                            "directory for this model.")
        if config is None:
            return
        stored = self.db.execute("SELECT value FROM meta WHERE key='config'").fetchone()
        if stored is None:
            with self.db:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('shape', ?)", (json.dumps(list(self.shape)),))
                if len(set(self.row_heads)) > 1:
                    self.db.execute("INSERT OR REPLACE INTO meta VALUES ('row_heads', ?)", (json.dumps(self.row_heads),))
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('config', ?)", (json.dumps(config, default=str),))
            return
        old = json.loads(stored[0])
        keys = list(keys) if keys is not None else sorted(set(old) | set(config))
        differ = [k for k in keys if json.dumps(old.get(k), default=str) != json.dumps(config.get(k), default=str)]
        if differ:
            detail = ", ".join(f"{k}: {old[k]!r} -> {config.get(k)!r}" if k in old else
                               f"{k}: not recorded (made at its default, or before the option existed) -> {config.get(k)!r}" for k in differ[:6])
            detail += f" and {len(differ) - 6} more" if len(differ) > 6 else ""
            raise UserError(
                f"Store {self.path} was made with a different configuration ({detail}); rerun with the "
                "original options or choose a new --out directory."
            )

    @property
    def config(self) -> dict:
        """The configuration recorded at creation."""
        row = self.db.execute("SELECT value FROM meta WHERE key='config'").fetchone()
        return json.loads(row[0]) if row else {}

    def update_config(self, **values) -> None:
        """Record new values of configuration keys (a continuation that extends what the store holds)."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('config', ?)",
                            (json.dumps({**self.config, **values}, default=str),))

    def sources(self) -> set[str]:
        """The distinct source labels of the stored evaluations."""
        return {r[0] for r in self.db.execute("SELECT DISTINCT source FROM evaluations")}

    def meta_value(self, key: str):
        """A JSON value recorded under ``key`` (None when absent)."""
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_meta_value(self, key: str, value) -> None:
        """Record a JSON value under ``key`` (committed at once)."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, default=float)))

    def register_setting(self, description: dict) -> str:
        """Record an evaluator setting; returns its fingerprint (the ``setting`` key)."""
        key = fingerprint(description)
        with self.db:
            self.db.execute("INSERT OR IGNORE INTO settings VALUES (?, ?)", (key, json.dumps(description, default=str)))
        return key

    def add(self, setting: str, split: str, source: str, evaluation) -> bool:
        """Commit one :class:`~attnprune.evaluation.Evaluation`; False if it was already there.

        An evaluation without bias (a perplexity-only confirmation: NaN bias, empty bias detail)
        keeps 0 in the bias column, which requires a number; it is read back as NaN.
        """
        detail = {k: v for k, v in evaluation.bias_detail.items() if k != "per_prompt"}
        detail = {"bias": detail, "perplexity": evaluation.perplexity_detail,
                  "prompt_scores": evaluation.bias_detail.get("per_prompt")}
        bias = 0.0 if not evaluation.bias_detail else float(evaluation.bias)
        with self.db:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO evaluations (mask_key, setting, split, source, n_pruned, bias, bias_lo, bias_hi,"
                " perplexity, detail, seconds, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (evaluation.mask.key, setting, split, source, evaluation.mask.n_pruned, bias,
                 float(evaluation.bias_ci[0]), float(evaluation.bias_ci[1]), float(evaluation.perplexity),
                 json.dumps(detail, default=float), float(evaluation.seconds),
                 _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
            )
            self.db.execute("INSERT OR IGNORE INTO labels VALUES (?, ?, ?)", (evaluation.mask.key, setting, source))
        return cur.rowcount == 1

    def label(self, setting: str, label: str, masks: Iterable[HeadMask]) -> None:
        """Tag stored masks with ``label`` too (a mask is evaluated once, but several methods may use it)."""
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO labels VALUES (?, ?, ?)",
                                [(m.key, setting, label) for m in masks])

    def setting_of(self, source: str) -> str | None:
        """The setting under which rows of ``source`` were evaluated (e.g. the run's validation setting)."""
        row = self.db.execute("SELECT setting FROM evaluations WHERE source=? ORDER BY id LIMIT 1", (source,)).fetchone()
        return row[0] if row else None

    def keys(self, setting: str) -> set[str]:
        """Mask keys already evaluated under ``setting``."""
        return {r[0] for r in self.db.execute("SELECT mask_key FROM evaluations WHERE setting=?", (setting,))}

    def pairs(self) -> set[tuple[str, str]]:
        """(setting, mask key) of every stored evaluation."""
        return set(self.db.execute("SELECT setting, mask_key FROM evaluations"))

    def get(self, mask: HeadMask, setting: str) -> StoredEvaluation | None:
        """The stored evaluation of ``mask`` under ``setting``, if any."""
        rows = self._rows("WHERE mask_key=? AND setting=?", (mask.key, setting))
        return rows[0] if rows else None

    def evaluations(self, setting: str, sources: Iterable[str] | None = None) -> list[StoredEvaluation]:
        """All evaluations under ``setting`` (optionally only those labelled with one of ``sources``), in insertion order.

        A mask's row keeps the source that first evaluated it; every later use under another
        label (:meth:`label`) finds it too.
        """
        if sources is None:
            return self._rows("WHERE setting=?", (setting,))
        sources = list(sources)
        marks = ",".join("?" * len(sources))
        return self._rows(f"WHERE setting=? AND mask_key IN (SELECT mask_key FROM labels WHERE setting=? AND label IN "
                          f"({marks}))", (setting, setting, *sources))

    def count(self, setting: str | None = None) -> int:
        """Number of stored evaluations (under ``setting`` when given)."""
        if setting is None:
            return self.db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM evaluations WHERE setting=?", (setting,)).fetchone()[0]

    def _rows(self, where: str, params: tuple) -> list[StoredEvaluation]:
        q = ("SELECT mask_key, split, source, bias, bias_lo, bias_hi, perplexity, detail, seconds, created "
             f"FROM evaluations {where} ORDER BY id")
        out = []
        for k, split, source, bias, lo, hi, ppl, detail, secs, created in self.db.execute(q, params):
            detail = json.loads(detail or "{}")
            if detail.get("bias") == {}:  # measured without bias (see :meth:`add`)
                bias, lo, hi = float("nan"), float("nan"), float("nan")
            if ppl is None:  # measured without perplexity: SQLite keeps NaN as NULL
                ppl = float("nan")
            out.append(StoredEvaluation(HeadMask.from_key(k, *self.shape), split, source, bias, (lo, hi), ppl, detail,
                                        secs, created))
        return out

    def close(self) -> None:
        """Close the database."""
        self.db.close()
