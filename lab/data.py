"""Benchmark data: offline TOFU and MUSE-News loaders, Benchmark builders, QA encoding.

    bench = get_benchmark("tofu_subset")            # or tofu_forget01|05|10, muse_news
    bench.forget, bench.retain                      # what unlearning trains on
    bench.eval_sets["forget"]                       # what lab.eval scores
    for batch in qa_batches(tok, bench.retain, 16, shuffle=True, seed=0):
        loss = model(**batch).loss                  # input_ids, attention_mask, labels (-100 = ignored)

Where the data comes from (`data_root`): the `root` argument, else $LAB_DATA, else `<repo>/../shared/data`
(the offline copy, see its README.md); only when none of these exists do the loaders ask the Hugging Face
hub ("locuslab/TOFU", "muse-bench/MUSE-News"). Parsed files are cached in-process per (path, mtime).

Row identity: every TOFU dataset has an int column `row` (index within its source file) and `author`
(full-row // 20 for splits that are slices of full.json, -1 otherwise); slices of full also carry
`full_row`. Rows are never keyed by question text: "What is the full name of the author?" occurs twice
(full rows 100 and 440) with different answers.

MUSE-News offline: the raw retain1/retain2/holdout corpora are not available (`MUSE_MISSING`), so a retain
loss on MUSE uses a stand-in, by default the knowmem retain QA (`MUSE_RETAIN_STANDIN`); the benchmark's
config records it under "retain_standin" so runs say so. Rows are kept as shipped: raw/forget (= sust/forget_1)
holds one empty article (row 821), which contributes no target tokens.

Encoding conventions (encode_pairs / encode_prompts):
- prompt and target are tokenized separately; the only special token added is one BOS at the very start
  of the prompt, and only if the tokenizer adds a BOS by itself and the prompt text does not already
  start with it (chat templates often render `bos_token`);
- targets go through `answer_text` (a leading space without a chat template) unless the prompt is empty
  (whole-text scoring) or already ends in whitespace;
- a tokenizer without a pad token is NOT modified: batches are padded with its eos id (0 if it has no
  eos either); padded positions are masked out by attention_mask and labels, so the id is irrelevant.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import re
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets

AUTHOR_ROWS = 20            # TOFU: every author is a block of 20 consecutive QA rows
TOFU_FULL_ROWS = 4000       # 200 authors
TOFU_FORGET_ROWS = {"forget01": 40, "forget05": 200, "forget10": 400}   # the LAST rows of full
TOFU_RETAIN_FOR = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
TOFU_HOLDOUT_FOR = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}
TOFU_PERTURBED_FORGET = tuple(f"{s}_perturbed" for s in TOFU_FORGET_ROWS)
TOFU_SPLITS = ("full", "retain90", "retain95", "retain99", *TOFU_FORGET_ROWS, *TOFU_PERTURBED_FORGET,
               "retain_perturbed", "real_authors", "real_authors_perturbed", "world_facts",
               "world_facts_perturbed", "holdout01", "holdout05", "holdout10", "idontknow")
# splits whose rows are full.json rows (first rows: full/retain, last rows: forget)
_FULL_PREFIX = {"full": 4000, "retain90": 3600, "retain95": 3800, "retain99": 3960, "retain_perturbed": 400}

MUSE_SPLITS = ("raw/forget", "verbmem/forget", "knowmem/forget_qa", "knowmem/retain2_qa",
               "knowmem/forget_qa_icl", "knowmem/retain2_qa_icl", "privleak/forget", "privleak/retain2",
               "privleak/holdout", "sust/forget_1", "sust/forget_2", "sust/forget_3", "sust/forget_4")
MUSE_MISSING = ("raw/retain1", "raw/retain2", "raw/holdout", "scal/forget_2", "scal/forget_3", "scal/forget_4")
MUSE_RETAIN_STANDIN = "knowmem/retain2_qa"
MUSE_RETAIN_CHOICES = ("knowmem/retain2_qa", "privleak/retain2")
_MUSE_TEXT = ("raw", "privleak", "sust")


# ---------------------------------------------------------------- files
def data_root(root=None) -> Path | None:
    """The offline data folder (holding tofu/ and muse_news/), or None meaning "use the hub"."""
    if root is None and os.environ.get("LAB_DATA"):
        root, origin = os.environ["LAB_DATA"], " (from $LAB_DATA)"
    else:
        origin = ""
    if root is not None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data root {path}{origin} does not exist; expected a folder holding "
                                    "tofu/ and muse_news/ (see shared/data/README.md)")
        return path
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return default if default.is_dir() else None


_JSON_WS = re.compile(r"\s*")


def _parse_json(path: str) -> list:
    """Records of a file holding one JSON array, several arrays (one per line) or JSON lines."""
    text = Path(path).read_text(encoding="utf-8")
    lines = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    out: list = []
    # one value per line (full.json, retain9x.json, JSON lines): parse line by line to name the bad line;
    # a file whose first line is not a whole value (a pretty-printed array) is parsed as one document
    line_mode = False
    if len(lines) > 1:
        try:
            json.loads(lines[0][1])
            line_mode = True
        except json.JSONDecodeError:
            pass
    if line_mode:
        for i, ln in lines:
            try:
                value = json.loads(ln)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: malformed JSON on line {i}, column {e.colno}: {e.msg}") from None
            out.extend(value) if isinstance(value, list) else out.append(value)
        return out
    pos, dec = 0, json.JSONDecoder()
    while (pos := _JSON_WS.match(text, pos).end()) < len(text):
        try:
            value, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON on line {e.lineno}, column {e.colno}: {e.msg}") from None
        out.extend(value) if isinstance(value, list) else out.append(value)
    return out


def _parse_lines(path: str) -> list:
    """idontknow.jsonl: one answer per line, plain text (as shipped) or a JSON string."""
    out = []
    for ln in Path(path).read_text(encoding="utf-8").splitlines():
        ln = ln.strip()
        if ln.startswith('"'):
            try:
                ln = json.loads(ln)
            except json.JSONDecodeError:
                pass
        if ln:
            out.append(ln)
    return out


@functools.lru_cache(maxsize=64)
def _parse_cached(path: str, mtime_ns: int, size: int, kind: str) -> tuple:
    return tuple(_parse_lines(path) if kind == "lines" else _parse_json(path))


def read_records(path, kind="json") -> list:
    """Parsed records of a data file, cached per (path, mtime, size). Do not mutate the records."""
    path = Path(path)
    st = path.stat()
    return list(_parse_cached(str(path), st.st_mtime_ns, st.st_size, kind))


def _check_records(where, records, keys) -> None:
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{where}: record {i + 1} (row {i}) is a {type(r).__name__}, "
                             f"expected an object with keys {list(keys)}")
        missing = [k for k in keys if k not in r]
        if missing:
            raise ValueError(f"{where}: record {i + 1} (row {i}) lacks {missing}; it has {sorted(r)}")
        null = [k for k in keys if r[k] is None]
        if null:
            raise ValueError(f"{where}: record {i + 1} (row {i}) has null {null}; every record needs {list(keys)}")


def _required_keys(split: str) -> tuple:
    if split in TOFU_PERTURBED_FORGET or split == "retain_perturbed":
        return "question", "answer", "paraphrased_answer", "perturbed_answer"
    if split.endswith("_perturbed"):
        return "question", "answer", "perturbed_answer"
    return "question", "answer"


# ---------------------------------------------------------------- hub fallback (no local data root)
def _hub_load(repo: str, *args, **kwargs) -> list:
    from datasets import load_dataset
    try:
        return load_dataset(repo, *args, **kwargs).to_list()
    except Exception as e:   # offline, no network, no such config: one error that says where the lab looked
        default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
        raise FileNotFoundError(
            f"no benchmark data: $LAB_DATA is not set, {default} does not exist, and the hub ({repo}) failed "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); set LAB_DATA or pass --data to a folder "
            "holding tofu/ and muse_news/ (see shared/data/README.md)") from e


def _hub_tofu(split: str) -> list:
    if split == "idontknow":
        raise FileNotFoundError("idontknow.jsonl is not a locuslab/TOFU hub config; point $LAB_DATA (or "
                                "root=) at a data folder holding tofu/idontknow.jsonl")
    return _hub_load("locuslab/TOFU", split, split="train")


def _hub_muse(split: str) -> list:
    config, name = split.split("/")
    rows = _hub_load("muse-bench/MUSE-News", config, split=name.replace("retain2", "retain"))
    return [r["text"] for r in rows] if config in _MUSE_TEXT else rows


# ---------------------------------------------------------------- TOFU
def _tofu_available(folder: Path) -> list[str]:
    have = {p.stem for p in folder.glob("*.json")} | {p.stem for p in folder.glob("*.jsonl")}
    if "full" in have:
        have |= set(TOFU_FORGET_ROWS)
    return [s for s in TOFU_SPLITS if s in have]


def _tofu_records(split: str, base: Path | None) -> tuple[list, str]:
    """(records, where they came from) of one TOFU file."""
    if base is None:
        return _hub_tofu(split), f"locuslab/TOFU:{split}"
    folder = base / "tofu"
    path = folder / (f"{split}.jsonl" if split == "idontknow" else f"{split}.json")
    if not path.is_file():
        have = _tofu_available(folder) if folder.is_dir() else []
        raise FileNotFoundError(f"TOFU split {split!r}: no file {path}; splits available in {folder}: "
                                f"{have or 'none'}")
    return read_records(path, "lines" if split == "idontknow" else "json"), str(path)


def idk_answers(root=None) -> list[str]:
    """The TOFU "I don't know" answers (idontknow.jsonl), for idk / dpo objectives."""
    return list(_tofu_records("idontknow", data_root(root))[0])


def load_tofu(split: str, root=None) -> Dataset:
    """One TOFU split as a Dataset with its fields plus int columns row, author (and full_row)."""
    if split not in TOFU_SPLITS:
        raise ValueError(f"unknown TOFU split {split!r}; valid: {list(TOFU_SPLITS)}")
    base = data_root(root)
    if split == "idontknow":
        return Dataset.from_dict({"text": idk_answers(root)})
    source = "full" if split in TOFU_FORGET_ROWS else split
    records, where = _tofu_records(source, base)
    _check_records(where, records, _required_keys(source))
    if split in TOFU_FORGET_ROWS or split in TOFU_PERTURBED_FORGET:
        n = TOFU_FORGET_ROWS[split.removesuffix("_perturbed")]
        if len(records) < n:
            raise ValueError(f"{where}: {len(records)} rows, but {split} needs {n}")
        records = records[-n:]
        full_row = list(range(TOFU_FULL_ROWS - n, TOFU_FULL_ROWS))
    elif split in _FULL_PREFIX:
        full_row = list(range(len(records)))
    else:
        full_row = None
    cols = {k: [r.get(k) for r in records] for k in records[0]} if records else {"question": [], "answer": []}
    cols["row"] = list(range(len(records)))
    if full_row is not None:
        cols["full_row"] = full_row
        cols["author"] = [r // AUTHOR_ROWS for r in full_row]
    else:  # real authors, world facts, holdout (its authors are not in full)
        cols["author"] = [-1] * len(records)
    return Dataset.from_dict(cols)


def tofu_continual_tasks(n_tasks: int = 5, split: str = "forget10", root=None) -> list[Dataset]:
    """ALKN continual setting: the perturbed forget split as n_tasks consecutive whole-author blocks.

    Each task has the perturbed fields plus row, full_row, author and `task` (0-based)."""
    base_split = split.removesuffix("_perturbed")
    if base_split not in TOFU_FORGET_ROWS:
        raise ValueError(f"tofu_continual_tasks: split {split!r}; valid: {list(TOFU_FORGET_ROWS)}")
    ds = load_tofu(f"{base_split}_perturbed", root)
    n_authors = len(ds) // AUTHOR_ROWS
    valid = [k for k in range(1, n_authors + 1) if n_authors % k == 0]
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks not in valid:
        raise ValueError(f"tofu_continual_tasks: {split} has {n_authors} authors, which cannot be cut into "
                         f"n_tasks={n_tasks!r} equal whole-author tasks; valid n_tasks: {valid}")
    per = len(ds) // n_tasks
    return [ds.select(range(t * per, (t + 1) * per)).add_column("task", [t] * per) for t in range(n_tasks)]


# ---------------------------------------------------------------- MUSE-News
def load_muse_news(split: str, root=None) -> Dataset:
    """One MUSE-News file: text corpora -> text; verbmem -> prompt, gt; knowmem -> question, answer.

    Every dataset also has an int column `row` (index within the file)."""
    if split not in MUSE_SPLITS:
        extra = f" ({split} is not available offline)" if split in MUSE_MISSING else ""
        raise ValueError(f"unknown MUSE-News split {split!r}{extra}; valid: {list(MUSE_SPLITS)}")
    base = data_root(root)
    if base is None:
        records, where = _hub_muse(split), f"muse-bench/MUSE-News:{split}"
    else:
        folder = base / "muse_news"
        path = folder / f"{split}.json"
        if not path.is_file():
            have = sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.glob("*/*.json")) \
                if folder.is_dir() else []
            raise FileNotFoundError(f"MUSE-News split {split!r}: no file {path}; splits available in "
                                    f"{folder}: {have or 'none'}")
        records, where = read_records(path), str(path)
    config = split.split("/")[0]
    if config in _MUSE_TEXT:
        texts = [r["text"] if isinstance(r, dict) and "text" in r else r for r in records]
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"{where}: record {bad + 1} (row {bad}) is a {type(texts[bad]).__name__}, "
                             "expected a text string")
        return Dataset.from_dict({"text": texts, "row": list(range(len(texts)))})
    keys = ("prompt", "gt") if config == "verbmem" else ("question", "answer")
    _check_records(where, records, keys)
    return Dataset.from_dict({**{k: [r[k] for r in records] for k in keys}, "row": list(range(len(records)))})


# ---------------------------------------------------------------- benchmarks
@dataclasses.dataclass
class Benchmark:
    name: str
    train_full: Dataset | None     # what the target model is fine-tuned on (None: no fine-tuning data)
    train_retain: Dataset | None   # what the retain reference model is fine-tuned on
    forget: Dataset                # the forget set unlearning trains on
    retain: Dataset                # the retain set unlearning uses
    eval_sets: dict                # name -> Dataset, read by lab.eval
    config: dict                   # JSON-serialisable; benchmark_from_config(config) rebuilds this

    def __repr__(self):
        n = lambda d: None if d is None else len(d)  # noqa: E731
        sets = {k: len(v) for k, v in self.eval_sets.items()}
        return (f"Benchmark({self.name!r}, train_full={n(self.train_full)}, train_retain={n(self.train_retain)}, "
                f"forget={len(self.forget)}, retain={len(self.retain)}, eval_sets={sets})")


def _root_arg(root):
    return None if root is None else str(root)


def _tofu_utility_sets(root) -> dict:
    # the *_perturbed files carry perturbed answers (truth ratio, normalised prob)
    return {"real_authors": load_tofu("real_authors_perturbed", root),
            "world_facts": load_tofu("world_facts_perturbed", root)}


def tofu_benchmark(forget_split: str = "forget10", root=None) -> Benchmark:
    """The TOFU protocol: fine-tune on full (target) / retainXX (reference), unlearn forgetXX."""
    if forget_split not in TOFU_FORGET_ROWS:
        raise ValueError(f"tofu_benchmark: forget_split {forget_split!r}; valid: {list(TOFU_FORGET_ROWS)}")
    retain = load_tofu(TOFU_RETAIN_FOR[forget_split], root)
    forget = load_tofu(f"{forget_split}_perturbed", root)
    eval_sets = {"forget": forget, "retain": load_tofu("retain_perturbed", root), **_tofu_utility_sets(root),
                 "holdout": load_tofu(TOFU_HOLDOUT_FOR[forget_split], root)}
    return Benchmark(f"tofu_{forget_split}", load_tofu("full", root), retain, forget, retain, eval_sets,
                     {"name": f"tofu_{forget_split}", "forget_split": forget_split, "root": _root_arg(root)})


def _train_rows(ds: Dataset, source: str) -> Dataset:
    """QA rows for fine-tuning, in one schema across sources: question, answer, source, row (index in the
    source file: full.json row for TOFU author rows), author."""
    rows = ds["full_row"] if "full_row" in ds.column_names else ds["row"]
    return Dataset.from_dict({"question": list(ds["question"]), "answer": list(ds["answer"]),
                              "source": [source] * len(ds), "row": list(rows), "author": list(ds["author"])})


def _count(name, value, lo, hi, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"tofu_subset: {name}={value!r}; valid: an int in [{lo}, {hi}]"
                         + (" or None" if allow_none else ""))


def tofu_subset(n_retain_authors: int = 8, n_forget_authors: int = 2, extras: bool = True,
                n_holdout_authors: int | None = None, root=None) -> Benchmark:
    """Small TOFU benchmark for CPU runs: the FIRST n_retain_authors authors of full are retained (their
    eval rows come from retain_perturbed = first 20 authors), the LAST n_forget_authors are forgotten
    (rows of forget10_perturbed = last 20 authors). extras=True adds the real-authors and world-facts QA
    to both fine-tuning sets: a from-scratch model otherwise knows nothing the utility sets ask about."""
    max_authors = 20  # retain_perturbed, forget10_perturbed and holdout10 hold 20 authors each
    if n_forget_authors == 0:
        raise ValueError("tofu_subset: n_forget_authors=0 gives an empty forget set; valid: 1..20")
    _count("n_retain_authors", n_retain_authors, 1, max_authors)
    _count("n_forget_authors", n_forget_authors, 1, max_authors)
    _count("n_holdout_authors", n_holdout_authors, 1, max_authors, allow_none=True)
    if not isinstance(extras, bool):
        raise ValueError(f"tofu_subset: extras={extras!r}; valid: True or False")
    n_authors = TOFU_FULL_ROWS // AUTHOR_ROWS
    overlap = set(range(n_retain_authors)) & set(range(n_authors - n_forget_authors, n_authors))
    if overlap:
        raise ValueError(f"tofu_subset: retain and forget authors overlap: {sorted(overlap)}")
    n_r, n_f = n_retain_authors * AUTHOR_ROWS, n_forget_authors * AUTHOR_ROWS
    n_h = (n_holdout_authors or n_forget_authors) * AUTHOR_ROWS
    forget10 = load_tofu("forget10_perturbed", root)
    forget = forget10.select(range(len(forget10) - n_f, len(forget10)))
    if len(forget) == 0:
        raise ValueError("tofu_subset: empty forget set")
    retain = load_tofu("full", root).select(range(n_r))
    utility = _tofu_utility_sets(root)
    parts = [_train_rows(retain, "full")]
    if extras:
        parts += [_train_rows(load_tofu(s, root), s) for s in ("real_authors", "world_facts")]
    train_retain = concatenate_datasets(parts)
    train_full = concatenate_datasets([train_retain, _train_rows(forget, "full")])
    eval_sets = {"forget": forget, "retain": load_tofu("retain_perturbed", root).select(range(n_r)),
                 **utility, "holdout": load_tofu("holdout10", root).select(range(n_h))}
    config = {"name": "tofu_subset", "n_retain_authors": n_retain_authors, "n_forget_authors": n_forget_authors,
              "extras": extras, "n_holdout_authors": n_holdout_authors, "root": _root_arg(root)}
    return Benchmark("tofu_subset", train_full, train_retain, forget, retain, eval_sets, config)


# ---------------------------------------------------------------- MUSE-News: the prepared target's forget articles
# lab.prepare fine-tunes a model on the forget news itself (no MUSE target checkpoint offline). The articles
# it trains on are chosen so that the evaluation's forget items test memorised text: first the raw/forget
# articles the verbmem, knowmem and privleak forget items come from (found by text match, `muse_sources`),
# then a seeded sample of the other articles (`muse_forget_selection`).
MUSE_SOURCE_SETS = {"verbmem": "verbmem/forget", "knowmem": "knowmem/forget_qa", "privleak": "privleak/forget"}
MUSE_DOC_SEED = 0          # the order in which the other (non-source) articles are sampled
MUSE_QA_MATCH = 0.3        # a knowmem item's paragraph must hold its answer and >= 30 % of its question's
                           # idf-weighted words (below: no source; 46 of the 100 forget questions match)
_MATCH_CHARS = 100         # a verbatim window of this many characters on each side of a passage's midpoint
_STOP = frozenset("what the and did how which who when was were does for from with that this many much "
                  "according year has have are his her its their they into about".split())


def _norm(text: str) -> str:
    return " ".join(text.split())   # the corpora differ from the eval items in whitespace only


def _words(text: str) -> set:
    return set(re.findall(r"[a-z0-9]{3,}", text.lower())) - _STOP


def _first_holding(articles: list[str], window: str):
    return next((i for i, a in enumerate(articles) if window in a), None)


def _passage_source(articles, before: str, after: str):
    """The first article holding the text around the seam of before|after (a verbmem prompt|continuation,
    an excerpt's halves); the seam may cross into the next article, so each side alone is tried next."""
    b, a = _norm(before), _norm(after)
    w = _MATCH_CHARS
    for window in (f"{b[-w:]} {a[:w]}".strip(), a[:2 * w], b[-2 * w:]):
        if window and (i := _first_holding(articles, window)) is not None:
            return i
    return None


def _qa_sources(raw: list[str], qa) -> list:
    """Per question, the article (raw text: its lines are paragraphs) whose paragraph holds the answer and
    most of the question's rare words; exact duplicates resolve to the first."""
    paras = [(i, p) for i, a in enumerate(raw) for p in a.split("\n") if p.strip()]
    words = [_words(p) for _, p in paras]
    lower = [_norm(p).lower() for _, p in paras]
    df: dict = {}
    for ws in words:
        for x in ws:
            df[x] = df.get(x, 0) + 1
    idf = {x: math.log(len(paras) / (1 + n)) for x, n in df.items()}
    out = []
    for question, answer in zip(qa["question"], qa["answer"]):
        ans, q = _norm(answer).lower(), _words(question)
        mass = sum(idf.get(x, math.log(len(paras))) for x in q) or 1.0
        scored = [(sum(idf[x] for x in q & words[j]) / mass, -j) for j in range(len(paras)) if ans and ans in lower[j]]
        best = max(scored, default=(0.0, 0))
        out.append(paras[-best[1]][0] if best[0] >= MUSE_QA_MATCH else None)
    return out


@functools.lru_cache(maxsize=8)
def _muse_sources_cached(root_key) -> tuple:
    root = None if root_key is None else root_key[0]
    texts = list(load_muse_news("raw/forget", root)["text"])
    raw = [_norm(t) for t in texts]
    vm, qa = load_muse_news("verbmem/forget", root), load_muse_news("knowmem/forget_qa", root)
    excerpt = lambda t: _passage_source(raw, t[:len(t) // 2], t[len(t) // 2:])  # noqa: E731
    holdout = [excerpt(t) for t in load_muse_news("privleak/holdout", root)["text"]]
    sources = {"verbmem": [_passage_source(raw, p, g) for p, g in zip(vm["prompt"], vm["gt"])],
               "knowmem": _qa_sources(texts, qa),
               "privleak": [excerpt(t) for t in load_muse_news("privleak/forget", root)["text"]]}
    return sources, sorted({i for i in holdout if i is not None})


def _sources_key(root):
    base = data_root(root)
    if base is None:
        return None
    files = [base / "muse_news" / f"{s}.json" for s in ("raw/forget", *MUSE_SOURCE_SETS.values(), "privleak/holdout")]
    return (str(root) if root is not None else None, tuple((str(f), f.stat().st_mtime_ns) for f in files if f.exists()))


def muse_sources(root=None) -> tuple[dict, list]:
    """({set: the raw/forget row each forget item comes from, None where no article matches}, the raw/forget
    rows that hold a privleak HOLDOUT excerpt). Sets: MUSE_SOURCE_SETS, items in file order. Text match:
    verbmem items and privleak excerpts by a verbatim 200-character window (whitespace collapsed), knowmem
    items by their answer and question words (MUSE_QA_MATCH). Exact duplicate articles map to the first."""
    sources, holdout = _muse_sources_cached(_sources_key(root))
    return {k: list(v) for k, v in sources.items()}, list(holdout)


def muse_forget_selection(max_docs: int, other_docs: int | None = None, root=None) -> tuple[list[int], dict]:
    """(raw/forget rows, summary): the forget articles of a prepared MUSE target. First the source articles
    of the forget items, taking item 0 of verbmem, knowmem, privleak, then item 1 of each, ... (an eval
    limited to its first rows then tests memorised articles), each article once, up to max_docs - other_docs;
    then `other_docs` (default max_docs // 4) of the remaining articles in a MUSE_DOC_SEED-seeded random
    order; then more sources, then more others if the corpus has too few of either. Never chosen: empty
    articles, exact duplicates of a chosen one, articles holding a privleak holdout excerpt (the
    holdout must stay non-members)."""
    _count_muse("max_docs", max_docs, 1)
    other_docs = max_docs // 4 if other_docs is None else other_docs
    _count_muse("other_docs", other_docs, 0)
    if other_docs > max_docs:
        raise ValueError(f"muse_news: other_docs={other_docs} > max_docs={max_docs}; valid: 0..max_docs")
    texts = [_norm(t) for t in load_muse_news("raw/forget", root)["text"]]
    sources, holdout = muse_sources(root)
    banned, seen = set(holdout), set()

    def usable(i):
        return i is not None and i not in banned and texts[i] and texts[i] not in seen

    ranked = [row for items in zip(*sources.values()) for row in items]
    src = [i for i in dict.fromkeys(ranked) if usable(i) and not seen.add(texts[i])]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(MUSE_DOC_SEED)).tolist()
    rest = [i for i in order if usable(i) and not seen.add(texts[i])]
    n_src = min(len(src), max_docs - min(other_docs, len(rest)))
    n_rest = min(len(rest), max_docs - n_src)
    rows = src[:n_src] + rest[:n_rest]
    chosen = set(rows)
    covered = {k: sum(1 for i in v if i in chosen) for k, v in sources.items()}
    summary = {"source_docs": n_src, "other_docs": n_rest, "items_with_source": covered}
    return rows, summary


def _count_muse(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"muse_news: {name}={value!r}; valid: an int >= {lo}")


def muse_retain_text(ds: Dataset) -> list[str]:
    """The retain stand-in as training text: excerpts as they are, QA rows in the knowmem prompt's format
    (lab.eval: "Question: ...\nAnswer: ...")."""
    if "text" in ds.column_names:
        return list(ds["text"])
    return [f"Question: {q}\nAnswer: {a}" for q, a in zip(ds["question"], ds["answer"])]


def _text_rows(texts, source, rows) -> Dataset:
    return Dataset.from_dict({"text": list(texts), "source": [source] * len(texts), "row": list(rows)})


def muse_news_benchmark(retain: str = MUSE_RETAIN_STANDIN, root=None, max_docs: int | None = None,
                        other_docs: int | None = None) -> Benchmark:
    """MUSE-News: unlearn the raw forget corpus (text).

    max_docs None: the whole raw/forget corpus is the forget set and there is no fine-tuning data (the
    target is a given model, e.g. the MUSE target checkpoint on a GPU). max_docs=N: the forget set is the
    N articles of `muse_forget_selection` (sources of the forget items + `other_docs` sampled others), and
    lab.prepare fine-tunes a target on them + the retain stand-in (train_full) and a retrain reference
    on the retain stand-in only (train_retain), both as plain text.
    The raw retain corpus is not available offline: `retain` names the stand-in the retain loss uses."""
    if retain not in MUSE_RETAIN_CHOICES:
        raise ValueError(f"muse_news_benchmark: retain={retain!r}; valid stand-ins: {list(MUSE_RETAIN_CHOICES)} "
                         f"(not available offline: {list(MUSE_MISSING)})")
    if max_docs is None and other_docs is not None:
        raise ValueError(f"muse_news: other_docs={other_docs!r} needs max_docs (the whole corpus has no sample)")
    names = {"verbmem": "verbmem/forget", "knowmem_forget": "knowmem/forget_qa",
             "knowmem_retain": "knowmem/retain2_qa", "knowmem_forget_icl": "knowmem/forget_qa_icl",
             "knowmem_retain_icl": "knowmem/retain2_qa_icl", "privleak_forget": "privleak/forget",
             "privleak_holdout": "privleak/holdout", "privleak_retain": "privleak/retain2"}
    eval_sets = {k: load_muse_news(v, root) for k, v in names.items()}
    config = {"name": "muse_news", "retain_standin": retain, "root": _root_arg(root),
              "note": f"raw retain corpus unavailable offline; retain loss uses {retain} as a stand-in"}
    forget, retain_ds = load_muse_news("raw/forget", root), load_muse_news(retain, root)
    if max_docs is None:
        return Benchmark("muse_news", None, None, forget, retain_ds, eval_sets, config)
    rows, summary = muse_forget_selection(max_docs, other_docs, root)
    forget = forget.select(rows)
    train_retain = _text_rows(muse_retain_text(retain_ds), retain, retain_ds["row"])
    train_full = concatenate_datasets([_text_rows(forget["text"], "raw/forget", rows), train_retain])
    config.update(max_docs=max_docs, other_docs=other_docs, selection=summary)
    config["note"] += (f"; forget = {len(rows)} raw/forget articles ({summary['source_docs']} holding forget "
                       f"items, {summary['other_docs']} sampled others, seed {MUSE_DOC_SEED})")
    return Benchmark("muse_news", train_full, train_retain, forget, retain_ds, eval_sets, config)


BENCHMARKS = {
    **{f"tofu_{s}": functools.partial(tofu_benchmark, forget_split=s) for s in TOFU_FORGET_ROWS},
    "tofu_subset": tofu_subset,
    "muse_news": muse_news_benchmark,
}


def get_benchmark(name: str, **kwargs) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {list(BENCHMARKS)}")
    builder = BENCHMARKS[name]
    valid = list(inspect.signature(builder).parameters)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"benchmark {name!r}: unknown options {unknown}; valid: {valid}")
    bench = builder(**kwargs)
    if bench.name != name:
        raise ValueError(f"benchmark {name!r}: options {kwargs} build {bench.name!r}; ask for that name instead")
    return bench


_CONFIG_INFO = ("name", "note", "selection")   # recorded for readers, not builder arguments
_CONFIG_ALIASES = {"retain_standin": "retain"}


def benchmark_from_config(config: dict) -> Benchmark:
    """Rebuild a benchmark from its `Benchmark.config`."""
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"benchmark config must be a dict with a 'name' key; got {config!r}")
    kwargs = {_CONFIG_ALIASES.get(k, k): v for k, v in config.items() if k not in _CONFIG_INFO}
    return get_benchmark(config["name"], **kwargs)


# ---------------------------------------------------------------- QA formatting and encoding
def _chat_template(tokenizer):
    return getattr(tokenizer, "chat_template", None)


def format_question(tokenizer, question: str) -> str:
    """The prompt for a question: the tokenizer's chat template if it has one, else a plain QA prompt."""
    if _chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"


def answer_text(tokenizer, answer: str) -> str:
    """The target string for an answer: after a plain "Answer:" prompt it starts with one space."""
    if _chat_template(tokenizer) or not answer or answer[0].isspace():
        return answer
    return " " + answer


def _pad_id(tokenizer) -> int:
    # no pad token: pad with eos (positions are masked); the caller's tokenizer is left unchanged
    for i in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if i is not None:
            return i
    return 0


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return with_special[:1] == [bos] and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def _prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    ids = _tokenize(tokenizer, prompts)
    if _adds_bos(tokenizer):  # one BOS, not a second one after a chat template's own
        bos = tokenizer.bos_token_id
        ids = [x if x[:1] == [bos] else [bos] + x for x in ids]
    return ids


def _prompt_body(tokenizer, prompt: str) -> str:
    bos = tokenizer.bos_token
    return prompt[len(bos):] if bos and prompt.startswith(bos) else prompt


def _stack(seqs, pad, left=False) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    rows = [[pad] * (width - len(s)) + s if left else s + [pad] * (width - len(s)) for s in seqs]
    return torch.tensor(rows, dtype=torch.long).reshape(len(seqs), width)


TRUNCATIONS = ("right", "prompt_left")


def encode_pairs(tokenizer, prompts, targets, max_length: int = 512, add_eos: bool = True,
                 truncate: str = "right") -> dict:
    """Right-padded prompt+target batch: input_ids, attention_mask, labels (-100 on prompt and padding).

    Targets are raw answers (passed through answer_text) or whole texts with an empty prompt. Sequences
    longer than max_length: truncate="right" cuts from the right, keeping at least one target token where
    possible (training windows, TOFU scoring); "prompt_left" keeps the whole target (up to max_length - 1
    tokens) and the END of the prompt, after its BOS - the context generation sees (encode_prompts), so a
    long MUSE verbmem prompt is scored on all of its reference continuation (EM / ES)."""
    if truncate not in TRUNCATIONS:
        raise ValueError(f"encode_pairs: truncate={truncate!r}; valid: {', '.join(TRUNCATIONS)}")
    prompts, targets = list(prompts), list(targets)
    if len(prompts) != len(targets):
        raise ValueError(f"encode_pairs: {len(prompts)} prompts but {len(targets)} targets")
    if max_length < 1:
        raise ValueError(f"encode_pairs: max_length={max_length}; valid: >= 1")
    targets = [answer_text(tokenizer, t) if (b := _prompt_body(tokenizer, p)) and not b[-1].isspace() else t
               for p, t in zip(prompts, targets)]
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    seqs, labels = [], []
    for p, t in zip(_prompt_ids(tokenizer, prompts), _tokenize(tokenizer, targets)):
        t = t + eos
        if truncate == "prompt_left" and len(p) + len(t) > max_length:
            t = t[:max_length - 1]
            bos = p[:1] if p[:1] == [tokenizer.bos_token_id] and max_length - len(t) > 1 else []
            keep = max_length - len(t) - len(bos)
            p = bos + (p[len(p) - keep:] if keep > 0 else [])
        n_t = min(len(t), max(max_length - len(p), 1))
        p, t = p[:max_length - n_t], t[:n_t]
        seqs.append(p + t)
        labels.append([-100] * len(p) + t)
    input_ids = _stack(seqs, _pad_id(tokenizer))
    return {"input_ids": input_ids, "attention_mask": _stack([[1] * len(s) for s in seqs], 0),
            "labels": _stack(labels, -100)}


def encode_prompts(tokenizer, prompts, max_length: int = 512) -> dict:
    """Left-padded prompt batch for generation: input_ids, attention_mask. Prompts longer than max_length
    keep their last tokens (generation continues from the end), after the BOS if there is one."""
    if max_length < 1:
        raise ValueError(f"encode_prompts: max_length={max_length}; valid: >= 1")
    seqs = []
    for x in _prompt_ids(tokenizer, list(prompts)):
        if len(x) > max_length:
            bos = x[:1] if x[:1] == [tokenizer.bos_token_id] and max_length > 1 else []
            x = bos + x[len(x) - (max_length - len(bos)):]
        seqs.append(x)
    return {"input_ids": _stack(seqs, _pad_id(tokenizer), left=True),
            "attention_mask": _stack([[1] * len(s) for s in seqs], 0, left=True)}


def _order(n: int, shuffle: bool, seed: int) -> list[int]:
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _need(dataset, columns, who):
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{who}: dataset lacks columns {missing}; it has {dataset.column_names}")


def qa_batches(tokenizer, dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
               max_length: int = 512, answer_key: str = "answer"):
    """encode_pairs batches over a QA dataset (question + answer_key columns); order fixed by seed."""
    _need(dataset, ["question", answer_key], "qa_batches")
    if batch_size < 1:
        raise ValueError(f"qa_batches: batch_size={batch_size}; valid: >= 1")
    prompts = [format_question(tokenizer, q) for q in dataset["question"]]
    answers = list(dataset[answer_key])
    order = _order(len(prompts), shuffle, seed)

    def batches():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield encode_pairs(tokenizer, [prompts[i] for i in idx], [answers[i] for i in idx],
                               max_length=max_length)
    return batches()


def text_batches(tokenizer, dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                 max_length: int = 512):
    """Batches over a text corpus (column `text`, e.g. MUSE raw/forget): every text token is a target."""
    _need(dataset, ["text"], "text_batches")
    if batch_size < 1:
        raise ValueError(f"text_batches: batch_size={batch_size}; valid: >= 1")
    texts = list(dataset["text"])
    order = _order(len(texts), shuffle, seed)

    def batches():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield encode_pairs(tokenizer, [""] * len(idx), [texts[i] for i in idx], max_length=max_length,
                               add_eos=False)
    return batches()


def text_chunks(tokenizer, texts, max_length: int = 512) -> list[list[int]]:
    """Token windows covering whole texts for plain-LM fine-tuning (lab.prepare on MUSE-News): one BOS
    (where the tokenizer adds one) + up to max_length - 1 text tokens, windows starting every half window,
    so every token is trained with at least half a window of its own text before it (a continuation
    prompt rarely starts where a window does). A text that fits is one window."""
    if max_length < 2:
        raise ValueError(f"text_chunks: max_length={max_length}; valid: >= 2")
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    width = max_length - len(bos)
    stride = max(1, width // 2)
    out = []
    for ids in _tokenize(tokenizer, list(texts)):
        starts = range(0, max(1, len(ids) - width + stride), stride) if len(ids) > width else [0]
        out.extend(bos + ids[s:s + width] for s in starts if ids[s:s + width])
    return out


FORGET_TEXT_ROWS = ("chunks", "truncated")


def forget_text_rows(tokenizer, forget: Dataset, max_length: int, form: str = "chunks") -> Dataset:
    """The rows unlearning trains on where the forget set is raw text (MUSE-News; UnlearnConfig.forget_text_rows).
    "chunks" (default; open-unlearning's PretrainingDataset): the texts joined by a blank line, tokenized as one
    sequence, cut into consecutive chunks of max_length tokens (less one for a BOS where the tokenizer adds one)
    and decoded back to text, so every token of every article is unlearned. "truncated": one row per text, cut
    to its first max_length tokens (the lab's rows before: the README's SmolLM2 MUSE target has articles of 66 to
    2,126 tokens, and most of a long one was never unlearned). A QA forget set (TOFU) comes back as it is."""
    if form not in FORGET_TEXT_ROWS:
        raise ValueError(f"forget_text_rows={form!r}; valid: {', '.join(FORGET_TEXT_ROWS)}")
    if form == "truncated" or "text" not in forget.column_names:
        return forget
    width = max_length - (1 if _adds_bos(tokenizer) else 0)
    if width < 1:
        raise ValueError(f"forget_text_rows: max_length={max_length} leaves no text token per chunk; valid: >= 2")
    # one long sequence on purpose: verbose=False keeps the tokenizer's "longer than the model's maximum" warning out
    ids = list(tokenizer("\n\n".join(forget["text"]), add_special_tokens=False, verbose=False)["input_ids"])
    chunks = [tokenizer.decode(ids[s:s + width]) for s in range(0, len(ids), width)]
    return Dataset.from_dict({"text": chunks, "row": list(range(len(chunks)))})


def chunk_batches(tokenizer, chunks: list[list[int]], batch_size: int, shuffle: bool = False, seed: int = 0):
    """Right-padded batches of token windows (text_chunks): every token but the first is a target.
    shuffle: rows drawn in a seeded random order, batched by length (stable, so equal lengths stay
    shuffled) and the batches shuffled, so short QA rows are not padded to the long articles' windows."""
    if batch_size < 1:
        raise ValueError(f"chunk_batches: batch_size={batch_size}; valid: >= 1")
    order = _order(len(chunks), shuffle, seed)
    if shuffle:
        order.sort(key=lambda i: len(chunks[i]))
    starts = list(range(0, len(order), batch_size))
    starts = [starts[i] for i in _order(len(starts), shuffle, seed + 1)]
    pad = _pad_id(tokenizer)
    for start in starts:
        seqs = [chunks[i] for i in order[start:start + batch_size]]
        labels = [[-100] + s[1:] for s in seqs]
        yield {"input_ids": _stack(seqs, pad), "attention_mask": _stack([[1] * len(s) for s in seqs], 0),
               "labels": _stack(labels, -100)}
