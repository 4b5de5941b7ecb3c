"""Calibration / evaluation text loading: every SPEC form on temp files, sampling, packing, padding, errors."""

from __future__ import annotations

import copy
import json
import lzma
import sys
import types
from pathlib import Path

import pytest
import torch

from moe_compress.calibration import data
from moe_compress.calibration.data import (
    Document,
    build_calibration,
    evaluation_windows,
    read_documents,
    split_mixture,
)
from moe_compress.errors import UserError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def text(i: int, n_words: int = 30) -> str:
    """A distinct document: ``n_words`` words starting at an offset that depends on ``i``."""
    return f"doc{i} " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n_words))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def ids_of(tokenizer, s: str) -> list[int]:
    return tokenizer(s, add_special_tokens=False)["input_ids"]


# -- reading ------------------------------------------------------------------------------------------------

def test_txt_is_one_document(tmp_path):
    (tmp_path / "story.txt").write_text("line one\n\nline two\n")
    assert read_documents(str(tmp_path / "story.txt")) == [Document("line one\n\nline two\n", "story")]


def test_jsonl_domain_field_or_stem_and_blank_lines(tmp_path):
    p = tmp_path / "mix.jsonl"
    p.write_text('{"text": "a", "domain": "code"}\n\n{"text": "b"}\n  \n{"text": "c", "domain": null}\n')
    assert read_documents(p) == [Document("a", "code"), Document("b", "mix"), Document("c", "mix")]


def test_jsonl_xz(tmp_path):
    p = tmp_path / "wiki.jsonl.xz"
    with lzma.open(p, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "héllo"}) + "\n" + json.dumps({"text": "world", "domain": "w"}) + "\n")
    assert read_documents(str(p)) == [Document("héllo", "wiki"), Document("world", "w")]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is optional (the parquet extra; the dev extra installs it)")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x", "y"], "domain": ["d", None], "id": [1, 2]}), tmp_path / "t.parquet")
    assert read_documents(tmp_path / "t.parquet") == [Document("x", "d"), Document("y", "t")]


def test_wikitext_raw_rows_and_protocol(tmp_path, tokenizer):
    raw = " \n = Title = \n \n Some text . \n More text . \n \n"
    p = tmp_path / "wikitext2_test.raw"
    p.write_text(raw)
    docs = read_documents(p)
    assert [d.text for d in docs] == ["", " = Title = \n", "", " Some text . \n", " More text . \n", ""]
    assert {d.domain for d in docs} == {"wikitext2"}
    expect = tokenizer("\n\n".join(d.text for d in docs))["input_ids"]
    windows = evaluation_windows(docs, tokenizer, 4)["wikitext2"]
    assert windows.flatten().tolist() == expect[: len(expect) // 4 * 4]


def test_folder_sorted_and_filtered(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / ".hidden.jsonl").write_text("not json")
    (tmp_path / "sub").mkdir()
    assert read_documents(tmp_path) == [Document("a", "a"), Document("b1", "b"), Document("b2", "b")]


def test_path_with_plus_and_star_is_literal(tmp_path):
    p = tmp_path / "a+b*2.txt"
    p.write_text("x")
    assert split_mixture(str(p)) == [(str(p), 1.0)]
    assert read_documents(str(p)) == [Document("x", "a+b*2")]


def test_split_mixture():
    assert split_mixture("a.jsonl*3 + b.jsonl*1") == [("a.jsonl", 0.75), ("b.jsonl", 0.25)]
    assert split_mixture("a+b") == [("a", 0.5), ("b", 0.5)]
    assert split_mixture(r"C:\data\x.jsonl*0.7+hf:org/ds:cfg:train[:100]*0.3") == [
        (r"C:\data\x.jsonl", 0.7), ("hf:org/ds:cfg:train[:100]", 0.3)]


@pytest.fixture
def fake_datasets(monkeypatch):
    """A stand-in `datasets` module: load_dataset records its arguments and returns two rows."""
    calls = []

    class FakeDataset:
        column_names = ["text", "label"]

        def __getitem__(self, column):
            return {"text": ["first", "second"], "label": [0, 1]}[column]

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "missing":
            raise FileNotFoundError("Dataset 'missing' doesn't exist on the Hub\nmore detail")
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_spec(fake_datasets):
    assert read_documents("hf:org/ds") == [Document("first", "org/ds"), Document("second", "org/ds")]
    read_documents("hf:org/ds::test")
    read_documents("hf:wikitext:raw:train[:10%]")
    assert fake_datasets == [("org/ds", None, "train"), ("org/ds", None, "test"), ("wikitext", "raw", "train[:10%]")]
    with pytest.raises(UserError, match=r"cannot load hf:missing: Dataset 'missing' doesn't exist on the Hub$"):
        read_documents("hf:missing")


def test_builtin(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(data, "BUILTIN_DIR", tmp_path)
    write_jsonl(tmp_path / "tiny.jsonl", [{"text": text(i)} for i in range(3)])
    with lzma.open(tmp_path / "packed.jsonl.xz", "wt") as fh:
        fh.write(json.dumps({"text": "z"}) + "\n")
    assert data.builtin_names() == ["packed", "tiny"]
    assert [d.domain for d in read_documents("builtin:tiny")] == ["tiny"] * 3
    assert read_documents("builtin:packed") == [Document("z", "packed")]
    with pytest.raises(UserError, match="unknown builtin data 'nope': available are packed, tiny"):
        read_documents("builtin:nope")


def test_shipped_samples_feed_the_demo_in_full():
    """builtin:demo gives every calibration row the demo asks for; builtin:demo-eval every window, per domain."""
    from moe_compress.calibration.data import evaluation_windows
    from moe_compress.demo import demo_spec
    from moe_compress.models.loading import load_tokenizer
    from tools.testbed.sample import PROMPTS

    spec = demo_spec()
    tok = load_tokenizer(spec.model)
    cal = build_calibration(spec.calibration.data, tok, n_samples=spec.calibration.n_samples,
                            seq_len=spec.calibration.seq_len, seed=spec.calibration.seed)
    assert cal.input_ids.shape == (spec.calibration.n_samples, spec.calibration.seq_len)
    assert sorted(set(cal.domains)) == sorted(PROMPTS)
    windows = evaluation_windows(read_documents("builtin:demo-eval"), tok, spec.eval_seq_len)
    assert sorted(windows) == sorted(PROMPTS)
    assert min(len(w) for w in windows.values()) >= spec.max_windows


# -- calibration sets ---------------------------------------------------------------------------------------

@pytest.fixture
def corpus(tmp_path) -> Path:
    """A folder of two files of different sizes: big.jsonl (20 documents) and small.txt (one document)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "big.jsonl", [{"text": text(i)} for i in range(20)])
    (folder / "small.txt").write_text(text(99, 200))
    return folder


def test_packing_windows_are_the_document_stream(tmp_path, tokenizer):
    """Rows concatenated = documents (shuffled, each followed by eos) concatenated, partial tail dropped."""
    texts = [text(i, 5 + 3 * i) for i in range(8)]
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    eos = tokenizer.eos_token_id
    stream_len = sum(len(ids_of(tokenizer, t)) + 1 for t in texts)
    cs = build_calibration(str(p), tokenizer, n_samples=1000, seq_len=16, seed=3)
    assert cs.input_ids.shape == (stream_len // 16, 16) and cs.attention_mask.all()
    assert cs.domains == ["d"] * (stream_len // 16) and cs.n_tokens == cs.input_ids.numel()
    flat = cs.input_ids.flatten().tolist()
    pieces, start = [], 0
    for i, t in enumerate(flat):
        if t == eos:
            pieces.append(flat[start:i])
            start = i + 1
    expected = {tuple(ids_of(tokenizer, t)) for t in texts}
    assert len(set(map(tuple, pieces))) == len(pieces) and set(map(tuple, pieces)) <= expected
    assert any(tuple(e[: len(flat) - start]) == tuple(flat[start:]) for e in expected)  # the tail: a prefix


def test_packing_single_document_exact(tmp_path, tokenizer):
    (tmp_path / "one.txt").write_text(text(0, 100))
    ids = ids_of(tokenizer, text(0, 100)) + [tokenizer.eos_token_id]
    cs = build_calibration(tmp_path / "one.txt", tokenizer, n_samples=3, seq_len=10)
    assert cs.input_ids.tolist() == [ids[0:10], ids[10:20], ids[20:30]]


def test_per_document_rows_are_padded(tmp_path, tokenizer):
    texts = ["short", text(1, 100)]
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    cs = build_calibration(p, tokenizer, n_samples=2, seq_len=12, packing=False)
    rows = {tuple(r[m.bool()].tolist()) for r, m in zip(cs.input_ids, cs.attention_mask)}
    assert rows == {tuple(tokenizer(t)["input_ids"][:12]) for t in texts}
    short = int(cs.attention_mask.sum(1).argmin())
    n_short = len(tokenizer("short")["input_ids"])
    assert cs.attention_mask[short].tolist() == [1] * n_short + [0] * (12 - n_short)
    assert (cs.input_ids[short, n_short:] == tokenizer.pad_token_id).all()
    assert cs.n_tokens == n_short + 12


def test_folder_sampled_evenly_across_files(corpus, tokenizer):
    cs = build_calibration(corpus, tokenizer, n_samples=6, seq_len=16)
    assert cs.domains == ["big"] * 3 + ["small"] * 3


def test_mixture_weights_honoured(corpus, tokenizer):
    spec = f"{corpus / 'big.jsonl'}*3+{corpus / 'small.txt'}*1"
    cs = build_calibration(spec, tokenizer, n_samples=8, seq_len=16)
    assert cs.domains == ["big"] * 6 + ["small"] * 2 and cs.spec == spec


def test_short_domain_filled_from_others(tmp_path, tokenizer):
    write_jsonl(tmp_path / "big.jsonl", [{"text": text(i)} for i in range(20)])
    (tmp_path / "tiny.txt").write_text(text(5, 12))  # about two windows of 16 tokens
    n_tiny = (len(ids_of(tokenizer, text(5, 12))) + 1) // 16
    cs = build_calibration(tmp_path, tokenizer, n_samples=10, seq_len=16)
    assert cs.domains == ["big"] * (10 - n_tiny) + ["tiny"] * n_tiny


def test_fewer_rows_than_asked_warns(tmp_path, tokenizer, caplog):
    (tmp_path / "t.txt").write_text(text(0, 40))
    cs = build_calibration(tmp_path / "t.txt", tokenizer, n_samples=100, seq_len=16)
    assert 0 < cs.input_ids.shape[0] < 100 and "samples asked for" in caplog.text


def test_documents_input_grouped_by_domain(tokenizer):
    docs = [Document(text(i), "a" if i % 3 else "b") for i in range(12)]
    cs = build_calibration(docs, tokenizer, n_samples=4, seq_len=16, packing=False)
    assert cs.domains == ["b", "b", "a", "a"] and cs.spec == "<12 documents>"


def test_deterministic_under_seed(corpus, tokenizer):
    def build(seed, spec=str(corpus)):
        return build_calibration(spec, tokenizer, n_samples=6, seq_len=16, seed=seed)

    a, b, c = build(0), build(0), build(1)
    assert torch.equal(a.input_ids, b.input_ids) and a.sha256 == b.sha256
    assert not torch.equal(a.input_ids, c.input_ids) and a.sha256 != c.sha256
    assert build(0, str(corpus) + "/").sha256 != a.sha256  # the spec text is part of the hash


def test_chat_template(tmp_path, tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.txt").write_text("pear")
    cs = build_calibration(tmp_path / "t.txt", chat, n_samples=1, seq_len=64, packing=False, chat_template=True)
    row = cs.input_ids[0][cs.attention_mask[0].bool()].tolist()
    assert chat.decode(row) == f"<user>{data.CHAT_PROMPT}<assistant>pear"
    with pytest.raises(UserError, match="no chat template"):
        build_calibration(tmp_path / "t.txt", tokenizer, n_samples=1, seq_len=8, chat_template=True)


# -- evaluation windows -------------------------------------------------------------------------------------

def test_evaluation_windows_pinned(tokenizer):
    docs = [Document("abc abc", "x"), Document("def", "y"), Document("ghi ghi ghi", "x")]
    out = evaluation_windows(docs, tokenizer, 3)
    assert list(out) == ["x", "y"]
    x = tokenizer("abc abc\n\nghi ghi ghi")["input_ids"]
    assert out["x"].tolist() == [x[i:i + 3] for i in range(0, len(x) - 2, 3)]
    assert out["x"].dtype == torch.long and out["y"].shape[1] == 3
    assert evaluation_windows([Document("a", "z")], tokenizer, 50)["z"].shape == (0, 50)
    spaced = tokenizer("abc abc ghi ghi ghi")["input_ids"]
    assert evaluation_windows(docs, tokenizer, 2, join=" ")["x"].flatten().tolist() == spaced[: len(spaced) // 2 * 2]


# -- user errors --------------------------------------------------------------------------------------------

ERRORS = [  # (id, files to create under tmp, SPEC with {tmp}, message pattern)
    ("missing path", {}, "{tmp}/nope.jsonl", r"data path not found: .*nope\.jsonl \(give a file"),
    ("empty file", {"e.jsonl": "\n"}, "{tmp}/e.jsonl", r"e\.jsonl has no text"),
    ("blank txt", {"e.txt": "  \n"}, "{tmp}/e.txt", r"e\.txt has no text"),
    ("empty folder", {"empty/": None, "empty/notes.md": "x"}, "{tmp}/empty", r"folder .*empty has no data files"),
    ("bad json", {"b.jsonl": '{"text": "ok"}\n{oops\n'}, "{tmp}/b.jsonl", r"b\.jsonl:2: invalid JSON"),
    ("not an object", {"l.jsonl": '["x"]\n'}, "{tmp}/l.jsonl", r"l\.jsonl:1: expected a JSON object"),
    ("missing text", {"m.jsonl": '{"text": "a"}\n{"body": "b"}\n'}, "{tmp}/m.jsonl",
     r'm\.jsonl:2: no "text" field \(fields: body\)'),
    ("text not str", {"n.jsonl": '{"text": 3}\n'}, "{tmp}/n.jsonl", r'n\.jsonl:1: "text" must be a string'),
    ("bad domain", {"d.jsonl": '{"text": "a", "domain": 1}\n'}, "{tmp}/d.jsonl", r'd\.jsonl:1: "domain" must be'),
    ("not utf-8", {"u.jsonl": b'{"text": "\xff"}\n'}, "{tmp}/u.jsonl", r"u\.jsonl:1: not UTF-8"),
    ("txt not utf-8", {"u.txt": b"\xff"}, "{tmp}/u.txt", r"u\.txt is not UTF-8"),
    ("bad xz", {"x.jsonl.xz": b"not xz"}, "{tmp}/x.jsonl.xz", r"cannot read .*x\.jsonl\.xz"),
    ("unsupported file", {"f.csv": "a"}, "{tmp}/f.csv", r"unsupported data file .*f\.csv: use \.txt"),
    ("unknown form", {}, "s3://bucket/data", r"unknown data spec form 's3://bucket/data': give a file"),
    ("empty spec", {}, " ", r"empty data spec"),
    ("hf without name", {}, "hf:", r"has no dataset name: write hf:NAME"),
    ("zero weight", {}, "a.jsonl*0+b.jsonl*1", r"bad mixture weight '0'"),
    ("word weight", {}, "a.jsonl*x+b.jsonl", r"bad mixture weight 'x'"),
    ("some weights", {}, "a.jsonl*2+b.jsonl", r"every component or to none"),
    ("empty component", {}, "a.jsonl++b.jsonl", r"empty component"),
    ("missing component", {"a.txt": "a"}, "{tmp}/a.txt*1+{tmp}/b.txt*1", r"data path not found: .*b\.txt"),
]


@pytest.mark.parametrize("files, spec, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_user_errors(tmp_path, files, spec, match):
    for name, content in files.items():
        path = tmp_path / name
        if content is None:
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    with pytest.raises(UserError, match=match) as info:
        read_documents(spec.format(tmp=tmp_path))
    assert "\n" not in str(info.value)


def test_missing_optional_dependencies(tmp_path, monkeypatch):
    (tmp_path / "t.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match=r"needs pyarrow: pip install 'moe-compress\[parquet\]'"):
        read_documents(tmp_path / "t.parquet")
    with pytest.raises(UserError, match=r"needs the datasets package: pip install 'moe-compress\[hf\]'"):
        read_documents("hf:org/ds")


def test_calibration_errors(tmp_path, tokenizer):
    (tmp_path / "t.txt").write_text("tiny")
    too_short = r"too short for one row of seq_len=64 \(its largest domain has \d+ tokens\): lower --seq-len"
    with pytest.raises(UserError, match=too_short):
        build_calibration(tmp_path / "t.txt", tokenizer, n_samples=4, seq_len=64)
    with pytest.raises(UserError, match="no text"):
        build_calibration([Document(" ", "a")], tokenizer, n_samples=4, seq_len=8)
    with pytest.raises(UserError, match="at least 1"):
        build_calibration(tmp_path / "t.txt", tokenizer, n_samples=0, seq_len=8)
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    with pytest.raises(UserError, match="eos token"):
        build_calibration(tmp_path / "t.txt", no_eos, n_samples=1, seq_len=2)
