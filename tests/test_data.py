"""lab.data: offline TOFU / MUSE-News loaders, benchmarks, QA encoding.

Data tests read the real files in <repo>/../shared/data (row counts from its README.md / SOURCES.json);
tokenizer tests build a tiny byte-level BPE tokenizer here, no hub.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lab import data

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
    if not SHARED.is_dir():
        pytest.skip(f"!!! OFFLINE BENCHMARK DATA MISSING: {SHARED} does not exist; the TOFU / MUSE-News "
                    "data tests cannot run without it !!!")
    return SHARED


def _copy_tofu(tmp_path, *names):
    (tmp_path / "tofu").mkdir()
    for n in names:
        shutil.copy(SHARED / "tofu" / n, tmp_path / "tofu" / n)
        os.chmod(tmp_path / "tofu" / n, 0o644)
    return tmp_path


# ---------------------------------------------------------------- TOFU files
TOFU_COUNTS = {"full": 4000, "retain90": 3600, "retain95": 3800, "retain99": 3960,
               "forget01": 40, "forget05": 200, "forget10": 400,
               "forget01_perturbed": 40, "forget05_perturbed": 200, "forget10_perturbed": 400,
               "retain_perturbed": 400, "real_authors": 100, "real_authors_perturbed": 100,
               "world_facts": 117, "world_facts_perturbed": 117,
               "holdout01": 40, "holdout05": 200, "holdout10": 400, "idontknow": 100}


def test_every_tofu_split_has_a_count():
    assert set(TOFU_COUNTS) == set(data.TOFU_SPLITS)


@pytest.mark.parametrize("split", list(TOFU_COUNTS))
def test_tofu_row_counts(shared_data, split):
    ds = data.load_tofu(split, root=shared_data)
    assert len(ds) == TOFU_COUNTS[split]
    if split == "idontknow":
        assert ds.column_names == ["text"]
    else:
        assert ds["row"] == list(range(len(ds)))
        assert {"question", "answer", "author"} <= set(ds.column_names)


def test_forget_splits_are_last_rows_of_full(shared_data):
    full = data.load_tofu("full", root=shared_data)
    for split, n in (("forget01", 40), ("forget05", 200), ("forget10", 400)):
        for name in (split, f"{split}_perturbed"):
            ds = data.load_tofu(name, root=shared_data)
            assert ds["question"] == full["question"][-n:] and ds["answer"] == full["answer"][-n:]
            assert ds["full_row"] == list(range(4000 - n, 4000))
            assert ds["author"] == [r // 20 for r in range(4000 - n, 4000)]
    f01 = data.load_tofu("forget01", root=shared_data)
    assert f01["row"][0] == 0 and f01["full_row"][0] == 3960 and f01["author"][0] == 198
    f10p = data.load_tofu("forget10_perturbed", root=shared_data)
    assert len(f10p["perturbed_answer"][0]) == 5 and f10p["paraphrased_answer"][0]


def test_retain_splits_are_first_rows_of_full(shared_data):
    full = data.load_tofu("full", root=shared_data)
    assert full["author"][:21] == [0] * 20 + [1] and full["author"][-1] == 199
    rp = data.load_tofu("retain_perturbed", root=shared_data)
    assert rp["question"] == full["question"][:400] and rp["answer"] == full["answer"][:400]
    assert rp["author"] == full["author"][:400] and rp["full_row"] == list(range(400))
    r90 = data.load_tofu("retain90", root=shared_data)
    assert r90["answer"] == full["answer"][:3600] and r90["author"][-1] == 179
    h10, h01 = data.load_tofu("holdout10", root=shared_data), data.load_tofu("holdout01", root=shared_data)
    assert h01["question"] == h10["question"][:40] and set(h10["author"]) == {-1}
    assert set(data.load_tofu("real_authors_perturbed", root=shared_data)["author"]) == {-1}


def test_duplicate_question_rows_stay_distinct(shared_data):
    full = data.load_tofu("full", root=shared_data)
    a, b = full[100], full[440]
    assert a["question"] == b["question"] == "What is the full name of the author?"
    assert a["answer"] != b["answer"]
    assert (a["row"], a["author"], b["row"], b["author"]) == (100, 5, 440, 22)
    assert full["question"].count("What is the full name of the author?") == 2


def test_idk_answers(shared_data):
    idk = data.idk_answers(root=shared_data)
    assert len(idk) == 100 and idk[0] == "I'm not certain about that." and all(idk)
    assert data.load_tofu("idontknow", root=shared_data)["text"] == idk


def test_continual_tasks(shared_data):
    tasks = data.tofu_continual_tasks(5, "forget10", root=shared_data)
    ref = data.load_tofu("forget10_perturbed", root=shared_data)
    assert [len(t) for t in tasks] == [80] * 5
    authors = [sorted(set(t["author"])) for t in tasks]
    assert authors == [list(range(180 + 4 * k, 184 + 4 * k)) for k in range(5)]  # 4 each, disjoint, in order
    assert [set(t["task"]) for t in tasks] == [{k} for k in range(5)]
    for col in ("question", "answer", "paraphrased_answer", "perturbed_answer", "row", "author"):
        assert sum((list(t[col]) for t in tasks), []) == list(ref[col])
    assert [len(t) for t in data.tofu_continual_tasks(2, "forget01", root=shared_data)] == [20, 20]
    with pytest.raises(ValueError, match=r"valid n_tasks: \[1, 2, 4, 5, 10, 20\]"):
        data.tofu_continual_tasks(3, root=shared_data)
    with pytest.raises(ValueError, match="forget10"):
        data.tofu_continual_tasks(5, "retain90", root=shared_data)


# ---------------------------------------------------------------- MUSE-News files
MUSE_COUNTS = {"raw/forget": 889, "verbmem/forget": 100, "knowmem/forget_qa": 100, "knowmem/retain2_qa": 100,
               "knowmem/forget_qa_icl": 10, "knowmem/retain2_qa_icl": 10, "privleak/forget": 100,
               "privleak/retain2": 100, "privleak/holdout": 100, "sust/forget_1": 889, "sust/forget_2": 889,
               "sust/forget_3": 889, "sust/forget_4": 887}


@pytest.mark.parametrize("split", list(MUSE_COUNTS))
def test_muse_row_counts(shared_data, split):
    ds = data.load_muse_news(split, root=shared_data)
    assert len(ds) == MUSE_COUNTS[split]
    cols = {"raw": ["text"], "privleak": ["text"], "sust": ["text"], "verbmem": ["prompt", "gt"],
            "knowmem": ["question", "answer"]}[split.split("/")[0]]
    assert ds.column_names == cols + ["row"]
    assert all(isinstance(x, str) for x in ds[cols[0]])
    # the real forget corpus holds one empty article (row 821); the loader keeps rows as they are
    empty = [i for i, x in enumerate(ds[cols[0]]) if not x]
    assert empty == ([821] if split in ("raw/forget", "sust/forget_1") else [])


def test_muse_sust_1_is_raw_forget(shared_data):
    assert (data.load_muse_news("sust/forget_1", root=shared_data)["text"]
            == data.load_muse_news("raw/forget", root=shared_data)["text"])
    assert set(data.MUSE_SPLITS) == set(MUSE_COUNTS)


# ---------------------------------------------------------------- benchmarks
def test_tofu_subset_shapes_and_authors(shared_data):
    b = data.tofu_subset(root=shared_data)
    assert b.name == "tofu_subset"
    assert (len(b.forget), len(b.retain), len(b.train_retain), len(b.train_full)) == (40, 160, 377, 417)
    assert {k: len(v) for k, v in b.eval_sets.items()} == {
        "forget": 40, "retain": 160, "real_authors": 100, "world_facts": 117, "holdout": 40}
    assert set(b.retain["author"]) == set(range(8)) and set(b.forget["author"]) == {198, 199}
    assert b.forget["full_row"] == list(range(3960, 4000))
    assert b.eval_sets["retain"]["question"] == b.retain["question"]
    assert "perturbed_answer" in b.eval_sets["retain"].column_names
    assert "perturbed_answer" in b.eval_sets["real_authors"].column_names
    tf = b.train_full.to_pandas()
    assert tf.groupby("source").size().to_dict() == {"full": 200, "real_authors": 100, "world_facts": 117}
    assert sorted(tf.query("source == 'full'")["row"]) == list(range(160)) + list(range(3960, 4000))
    assert not set(b.train_retain["question"]) & set(b.forget["question"])  # forget rows only in train_full
    small = data.tofu_subset(3, 1, extras=False, n_holdout_authors=4, root=shared_data)
    assert (len(small.train_retain), len(small.train_full), len(small.forget)) == (60, 80, 20)
    assert len(small.eval_sets["holdout"]) == 80 and set(small.train_full["source"]) == {"full"}
    assert small.config == {"name": "tofu_subset", "n_retain_authors": 3, "n_forget_authors": 1,
                            "extras": False, "n_holdout_authors": 4, "root": str(shared_data)}


def test_benchmark_config_roundtrip(shared_data):
    for b in (data.tofu_subset(2, 3, root=shared_data), data.tofu_benchmark("forget05", root=shared_data),
              data.muse_news_benchmark("privleak/retain2", root=shared_data)):
        again = data.benchmark_from_config(json.loads(json.dumps(b.config)))
        assert again.name == b.name and again.config == b.config
        assert again.forget["row"] == b.forget["row"] and len(again.retain) == len(b.retain)


def test_tofu_benchmark(shared_data):
    b = data.get_benchmark("tofu_forget05", root=shared_data)
    assert b.name == "tofu_forget05" and len(b.train_full) == 4000 and len(b.train_retain) == 3800
    assert len(b.forget) == 200 and "perturbed_answer" in b.forget.column_names
    assert b.retain["question"] == b.train_retain["question"]
    assert {k: len(v) for k, v in b.eval_sets.items()} == {
        "forget": 200, "retain": 400, "real_authors": 100, "world_facts": 117, "holdout": 200}
    with pytest.raises(ValueError, match="tofu_forget01"):  # options that contradict the name
        data.get_benchmark("tofu_forget05", forget_split="forget01", root=shared_data)


def test_muse_benchmark(shared_data):
    b = data.get_benchmark("muse_news", root=shared_data)
    assert b.train_full is None and b.train_retain is None
    assert b.forget.column_names == ["text", "row"] and len(b.forget) == 889
    assert b.config["retain_standin"] == data.MUSE_RETAIN_STANDIN == "knowmem/retain2_qa"
    assert b.retain.column_names == ["question", "answer", "row"] and len(b.retain) == 100
    assert {k: len(v) for k, v in b.eval_sets.items()} == {
        "verbmem": 100, "knowmem_forget": 100, "knowmem_retain": 100, "knowmem_forget_icl": 10,
        "knowmem_retain_icl": 10, "privleak_forget": 100, "privleak_holdout": 100, "privleak_retain": 100}
    assert "raw/retain2" in data.MUSE_MISSING
    with pytest.raises(ValueError, match="privleak/retain2"):
        data.muse_news_benchmark("raw/forget", root=shared_data)


# ---------------------------------------------------------------- bad input
def test_unknown_names_list_valid_ones(shared_data):
    with pytest.raises(ValueError, match="forget10_perturbed.*idontknow"):
        data.load_tofu("forget20", root=shared_data)
    with pytest.raises(ValueError, match="not available offline.*sust/forget_4"):
        data.load_muse_news("raw/retain1", root=shared_data)
    with pytest.raises(ValueError, match="tofu_forget01.*tofu_subset.*muse_news"):
        data.get_benchmark("tofu")
    with pytest.raises(ValueError, match="unknown options.*n_retain_authors"):
        data.get_benchmark("tofu_subset", n_retain=3)


def test_missing_root_and_file(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        data.load_tofu("full", root=missing)
    monkeypatch.setenv("LAB_DATA", str(missing))
    with pytest.raises(FileNotFoundError, match=r"\$LAB_DATA"):
        data.load_muse_news("raw/forget")
    monkeypatch.delenv("LAB_DATA")
    assert data.data_root() == (SHARED if SHARED.is_dir() else None)
    root = _copy_tofu(tmp_path, "full.json")
    available = r"\['full', 'forget01', 'forget05', 'forget10'\]"
    with pytest.raises(FileNotFoundError, match=rf"holdout10\.json.*{available}"):
        data.load_tofu("holdout10", root=root)
    with pytest.raises(FileNotFoundError, match="muse_news"):
        data.load_muse_news("raw/forget", root=root)


def test_malformed_json_names_file_and_line(shared_data, tmp_path):
    root = _copy_tofu(tmp_path, "full.json", "world_facts_perturbed.json")
    path = root / "tofu" / "full.json"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]  # cut the end of the 3rd of 4 arrays
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{path}: malformed JSON on line 3, column \d+"):
        data.load_tofu("full", root=root)
    with pytest.raises(ValueError, match="line 3"):  # forget splits read full.json too
        data.load_tofu("forget10", root=root)
    path = root / "tofu" / "world_facts_perturbed.json"
    path.write_text(path.read_text().replace('"answer":"Paris"', '"answer":Paris', 1))
    # P is column 64: '[{' (2) + '"question":' (11) + the quoted question (40) + ',' (1) + '"answer":' (9)
    with pytest.raises(ValueError, match=rf"{path}: malformed JSON on line 1, column 64: Expecting value"):
        data.load_tofu("world_facts_perturbed", root=root)


def test_missing_key_names_file_and_row(tmp_path):
    root = _copy_tofu(tmp_path, "retain_perturbed.json")
    path = root / "tofu" / "retain_perturbed.json"
    records = json.loads(path.read_text())
    del records[7]["answer"]
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=rf"{path}: record 8 \(row 7\) lacks \['answer'\]"):
        data.load_tofu("retain_perturbed", root=root)


def test_cache_follows_file_changes(tmp_path):
    root = _copy_tofu(tmp_path, "world_facts.json")
    assert len(data.load_tofu("world_facts", root=root)) == 117
    path = root / "tofu" / "world_facts.json"
    path.write_text(json.dumps(json.loads(path.read_text())[:5]))
    os.utime(path, ns=(1, 1))  # a distinct mtime even on coarse-clock file systems
    ds = data.load_tofu("world_facts", root=root)
    assert len(ds) == 5 and ds["answer"][0] == "Paris"


def test_hub_fallback_without_local_root(shared_data, monkeypatch):
    """No local data root: the loaders ask datasets.load_dataset (faked here from the local files)."""
    import datasets
    asked = []

    def fake_load_dataset(repo, config, split):
        asked.append((repo, config, split))
        if repo == "locuslab/TOFU":
            return Dataset.from_list(json.loads((shared_data / "tofu" / f"{config}.json").read_text()))
        name = split.replace("retain", "retain2")
        rows = json.loads((shared_data / "muse_news" / config / f"{name}.json").read_text())
        return Dataset.from_list([{"text": r} for r in rows] if config == "privleak" else rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data, "data_root", lambda root=None: None)
    ds = data.load_tofu("forget01_perturbed")
    assert len(ds) == 40 and ds["full_row"][0] == 3960
    assert len(data.load_muse_news("knowmem/retain2_qa")) == 100
    texts = json.loads((shared_data / "muse_news" / "privleak" / "retain2.json").read_text())
    assert list(data.load_muse_news("privleak/retain2")["text"]) == texts
    assert asked == [("locuslab/TOFU", "forget01_perturbed", "train"),
                     ("muse-bench/MUSE-News", "knowmem", "retain_qa"),
                     ("muse-bench/MUSE-News", "privleak", "retain")]
    with pytest.raises(FileNotFoundError, match="idontknow"):
        data.idk_answers()


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_forget_authors=0), "empty forget set"),
    (dict(n_retain_authors=0), "n_retain_authors=0"),
    (dict(n_retain_authors=21), r"n_retain_authors=21; valid: an int in \[1, 20\]"),
    (dict(n_retain_authors=2.5), "n_retain_authors=2.5"),
    (dict(n_retain_authors="8"), "n_retain_authors='8'"),
    (dict(n_forget_authors=21), "n_forget_authors=21"),
    (dict(n_holdout_authors=0), "n_holdout_authors=0"),
    (dict(extras="yes"), "extras='yes'"),
])
def test_bad_subset_args(shared_data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.tofu_subset(root=shared_data, **kwargs)


# ---------------------------------------------------------------- tokenizer / encoding
SENTENCES = ["Question: What is the capital of France?\nAnswer: Paris is the capital of France.",
             "Question: Who wrote the book?\nAnswer: The author wrote the book in Kuwait City.",
             "The quick brown fox jumps over the lazy dog.", "<|user|> <|assistant|>"]
CHAT = ("{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer(chat=False):
    """Byte-level BPE that adds a BOS by itself (like Llama) and has no pad token."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    if chat:
        tok.chat_template = CHAT
    return tok


@pytest.fixture(scope="module")
def plain_tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return _tokenizer(chat=True)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_format_question_and_answer_text(plain_tok, chat_tok):
    assert data.format_question(plain_tok, "Who?") == "Question: Who?\nAnswer:"
    assert data.format_question(chat_tok, "Who?") == "<s><|user|>Who?<|assistant|>"
    assert data.answer_text(plain_tok, "Paris") == " Paris"
    assert data.answer_text(plain_tok, " Paris") == " Paris"
    assert data.answer_text(chat_tok, "Paris") == "Paris"


def _check_pair_row(enc, i, prompt_ids, target_ids, pad):
    n_p, n = len(prompt_ids), len(prompt_ids) + len(target_ids)
    ids, labels, mask = enc["input_ids"][i].tolist(), enc["labels"][i].tolist(), enc["attention_mask"][i].tolist()
    width = len(ids)
    assert ids[:n] == prompt_ids + target_ids
    assert ids[n:] == [pad] * (width - n)                     # right padding
    assert mask == [1] * n + [0] * (width - n)
    assert labels == [-100] * n_p + target_ids + [-100] * (width - n)


@pytest.mark.parametrize("chat", [False, True])
def test_encode_pairs_masks_prompt_and_padding(plain_tok, chat_tok, chat):
    tok = chat_tok if chat else plain_tok
    questions = ["What is the capital of France?", "Who wrote the book?"]
    answers = ["Paris is the capital of France.", "The author."]
    prompts = [data.format_question(tok, q) for q in questions]
    enc = data.encode_pairs(tok, prompts, answers)
    assert set(enc) == {"input_ids", "attention_mask", "labels"}
    assert enc["input_ids"].dtype == torch.long and enc["input_ids"].shape == enc["labels"].shape
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for i, (p, a) in enumerate(zip(prompts, answers)):
        p_ids = ([] if chat else [bos]) + _ids(tok, p)        # the chat template renders the BOS itself
        t_ids = _ids(tok, a if chat else " " + a) + [eos]
        assert p_ids[0] == bos and p_ids.count(bos) == 1
        _check_pair_row(enc, i, p_ids, t_ids, pad=eos)        # no pad token: eos pads
    assert enc["input_ids"][:, 0].tolist() == [bos, bos] and enc["input_ids"][:, 1].ne(bos).all()
    assert tok.pad_token is None                              # the caller's tokenizer is not modified


def test_encode_pairs_empty_prompt_truncation_and_no_eos(plain_tok):
    tok, bos, eos = plain_tok, plain_tok.bos_token_id, plain_tok.eos_token_id
    text = "The quick brown fox jumps over the lazy dog."
    enc = data.encode_pairs(tok, [""], [text], add_eos=False)  # whole-text scoring: no space prefix
    _check_pair_row(enc, 0, [bos], _ids(tok, text), pad=eos)
    same = data.encode_pairs(tok, ["<s>"], [text], add_eos=False)  # lab.eval passes the BOS text as prompt
    assert all(torch.equal(enc[k], same[k]) for k in enc)
    prompt = data.format_question(tok, "Who wrote the book?")
    p_ids, t_ids = [bos] + _ids(tok, prompt), _ids(tok, " The author wrote the book.") + [eos]
    enc = data.encode_pairs(tok, [prompt], ["The author wrote the book."], max_length=len(p_ids) + 2)
    assert enc["labels"][0].tolist() == [-100] * len(p_ids) + t_ids[:2]
    enc = data.encode_pairs(tok, [prompt], ["The author wrote the book."], max_length=5)
    assert enc["input_ids"][0].tolist() == p_ids[:4] + t_ids[:1]   # cut from the right, 1 target token kept
    assert enc["labels"][0].tolist() == [-100] * 4 + t_ids[:1]
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        data.encode_pairs(tok, ["a", "b"], ["c"])


def test_encode_prompts_left_pads(plain_tok, chat_tok):
    for tok in (plain_tok, chat_tok):
        bos = tok.bos_token_id
        prompts = [data.format_question(tok, "Who wrote the book?"), data.format_question(tok, "Who?")]
        enc = data.encode_prompts(tok, prompts)
        width = enc["input_ids"].shape[1]
        for i, p in enumerate(prompts):
            want = _ids(tok, p) if p.startswith("<s>") else [bos] + _ids(tok, p)
            assert want.count(bos) == 1
            assert enc["input_ids"][i].tolist() == [tok.eos_token_id] * (width - len(want)) + want
            assert enc["attention_mask"][i].tolist() == [0] * (width - len(want)) + [1] * len(want)
        assert enc["attention_mask"][1, 0] == 0 and enc["attention_mask"][0].all()
        short = data.encode_prompts(tok, prompts[:1], max_length=4)["input_ids"][0].tolist()
        full = enc["input_ids"][0].tolist()
        assert short == [bos] + full[-3:]                     # BOS + the end of the prompt


def _batch_rows(batches, singles):
    """Recover dataset row order from batches by matching each row to its single-row encoding."""
    order = []
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            order.append(singles.index(ids[mask.bool()].tolist()))
    return order


def test_qa_batches_deterministic_and_complete(plain_tok):
    tok = plain_tok
    ds = Dataset.from_dict({"question": [f"Who wrote book {i}?" for i in range(10)],
                            "answer": [f"The author of book {i}." for i in range(10)]})
    singles = [data.encode_pairs(tok, [data.format_question(tok, q)], [a])["input_ids"][0].tolist()
               for q, a in zip(ds["question"], ds["answer"])]
    plain = list(data.qa_batches(tok, ds, 3))
    assert [len(b["input_ids"]) for b in plain] == [3, 3, 3, 1]
    assert _batch_rows(plain, singles) == list(range(10))
    a = _batch_rows(data.qa_batches(tok, ds, 3, shuffle=True, seed=0), singles)
    b = _batch_rows(data.qa_batches(tok, ds, 3, shuffle=True, seed=0), singles)
    c = _batch_rows(data.qa_batches(tok, ds, 3, shuffle=True, seed=1), singles)
    assert a == b and a != c and sorted(a) == sorted(c) == list(range(10))
    assert a == torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    with pytest.raises(ValueError, match="paraphrased_answer"):
        data.qa_batches(tok, ds, 3, answer_key="paraphrased_answer")


def test_text_batches_label_every_token(plain_tok):
    tok, bos = plain_tok, plain_tok.bos_token_id
    ds = Dataset.from_dict({"text": ["The quick brown fox.", "The lazy dog jumps over the quick brown fox."]})
    (batch,) = list(data.text_batches(tok, ds, 4, max_length=6))
    for i, text in enumerate(ds["text"]):
        ids = ([bos] + _ids(tok, text))[:6]
        assert batch["input_ids"][i, :len(ids)].tolist() == ids
        assert batch["labels"][i, :len(ids)].tolist() == [-100] + ids[1:]
        assert batch["labels"][i, len(ids):].eq(-100).all()
    assert batch["input_ids"].shape[1] == 6


# ---------------------------------------------------------------- text forget rows (MUSE)
def test_forget_text_rows_cut_the_joined_texts_into_max_length_chunks_as_open_unlearning(plain_tok):
    from lab.data import forget_text_rows
    from lab.engine import encode_rows
    texts = ["The quick brown fox jumps over the lazy dog. " * 9, "Paris is the capital of France.",
             "Who wrote the book? The author wrote the book in Kuwait City. " * 5]
    forget = Dataset.from_dict({"text": texts, "row": [0, 1, 2]})
    rows = forget_text_rows(plain_tok, forget, max_length=32)
    joined = _ids(plain_tok, "\n\n".join(texts))
    width = 31                                                   # 32 less the BOS this tokenizer adds
    assert len(rows) == -(-len(joined) // width) and rows["row"] == list(range(len(rows)))
    # every token of the joined corpus is in exactly one chunk, in order (open-unlearning's PretrainingDataset)
    assert sum((_ids(plain_tok, t) for t in rows["text"]), []) == joined
    assert all(len(_ids(plain_tok, t)) <= width for t in rows["text"])
    batch = encode_rows(plain_tok, rows, range(len(rows)), max_length=32)   # what the loop trains on: no cut
    assert int(batch["attention_mask"].sum()) == len(joined) + len(rows)    # + one BOS per chunk
    # "truncated": the texts as they were (the loop cuts each to max_length); QA sets are not text
    assert forget_text_rows(plain_tok, forget, 32, "truncated") is forget
    qa = Dataset.from_dict({"question": ["q"], "answer": ["a"]})
    assert forget_text_rows(plain_tok, qa, 32) is qa
    with pytest.raises(ValueError, match="forget_text_rows='windows'; valid: chunks, truncated"):
        forget_text_rows(plain_tok, forget, 32, "windows")
