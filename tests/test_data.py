"""Data readers and validation: every malformed input names its file, line and field."""

import json
import math
import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from stable_rlhf.data import (
    DataError,
    load_dataset_records,
    load_records,
    pair_to_ranked,
    read_hh_rlhf,
    read_jsonl,
    validate_record,
)

PAIR = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "task": "math"}
RANKED = {"prompt": "Name a colour.", "responses": ["red", "blue", "green"], "ranking": [2, 0, 1], "task": "qa"}
HH_TURN1 = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
HH = {
    "chosen": HH_TURN1 + "\n\nAssistant:  Why did the chicken cross the road? \n",
    "rejected": HH_TURN1 + "\n\nAssistant: No.",
}


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' Arrow cache inside the test's temporary directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_lines(tmp_path, lines, name="data.jsonl"):
    """Write lines (dicts become JSON, str/bytes are written as-is) and return the path."""
    raw = b"".join(
        (line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()) + b"\n"
        for line in lines
    )
    path = tmp_path / name
    path.write_bytes(raw)
    return path


def check_error(err: DataError, path, line, field):
    assert (err.path, err.line, err.field) == (str(path), line, field), str(err)
    text = str(err)
    assert text.startswith(str(path) if line is None else f"{path}:{line}"), text
    if field is not None:
        assert f"field '{field}'" in text


# --------------------------------------------------------------------------- malformed JSONL

# (kind, lines, expected line, expected field, a word the message must contain)
MALFORMED = {
    "bad JSON on line 3": ("pair", [PAIR, PAIR, '{"prompt": "x", "chosen": '], 3, "<line>", "malformed JSON"),
    "missing chosen on line 2": ("pair", [PAIR, {"prompt": "p", "rejected": "r"}], 2, "chosen", "missing"),
    "ranking not a permutation": ("ranked", [{**RANKED, "ranking": [0, 0, 1]}], 1, "ranking", "permutation"),
    "ranking too short": ("ranked", [RANKED, {**RANKED, "ranking": [0, 1]}], 2, "ranking", "2 entries"),
    "ranking with a bool": ("ranked", [{**RANKED, "ranking": [0, True, 2]}], 1, "ranking[1]", "boolean"),
    "ranking out of range": ("ranked", [{**RANKED, "ranking": [0, 1, 3]}], 1, "ranking[2]", "out of range"),
    "ranking with a float": ("ranked", [{**RANKED, "ranking": [0, 1.0, 2]}], 1, "ranking[1]", "integer"),
    "ranking not a list": ("ranked", [{**RANKED, "ranking": "0,1,2"}], 1, "ranking", "array"),
    "duplicate responses": ("ranked", [{**RANKED, "responses": ["red", "blue", " red "]}], 1, "responses[2]", "duplicates responses[0]"),
    "one response only": ("ranked", [{**RANKED, "responses": ["red"], "ranking": [0]}], 1, "responses", "at least 2"),
    "response not a string": ("ranked", [{**RANKED, "responses": ["red", 7, "green"]}], 1, "responses[1]", "string"),
    "missing ranking": ("ranked", [{k: v for k, v in RANKED.items() if k != "ranking"}], 1, "ranking", "missing"),
    "chosen equals rejected": ("pair", [PAIR, PAIR, {**PAIR, "rejected": "4 "}], 3, "rejected", "identical"),
    "non-UTF-8 byte on line 4": ("pair", [PAIR, PAIR, PAIR, b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'], 4, "<line>", "byte offset 15"),
    "empty prompt": ("sft", [{"prompt": "", "response": "r"}], 1, "prompt", "empty"),
    "whitespace-only response": ("sft", [{"prompt": "p", "response": " \t "}], 1, "response", "whitespace"),
    "prompt a number": ("prompt", [{"prompt": "ok"}, {"prompt": 42}], 2, "prompt", "got integer"),
    "prompt a list": ("pair", [{**PAIR, "prompt": ["a", "b"]}], 1, "prompt", "got array"),
    "task empty": ("prompt", [{"prompt": "p", "task": ""}], 1, "task", "empty"),
    "task a number": ("sft", [{"prompt": "p", "response": "r", "task": 3}], 1, "task", "string"),
    "meta a list": ("prompt", [{"prompt": "p", "meta": [1, 2]}], 1, "meta", "object"),
    "gold with NaN": ("ranked", [{**RANKED, "gold": [1.0, float("nan"), 0.0]}], 1, "gold[1]", "finite"),
    "gold wrong length": ("ranked", [{**RANKED, "gold": [1.0, 2.0]}], 1, "gold", "2 entries"),
    "gold a string entry": ("ranked", [{**RANKED, "gold": [1.0, "2", 0.0]}], 1, "gold[1]", "number"),
    "sft_samples not bool": ("ranked", [{**RANKED, "sft_samples": "yes"}], 1, "sft_samples", "boolean"),
    "NUL in text": ("pair", [{**PAIR, "chosen": "fo\u0000ur"}], 1, "chosen", "NUL"),
    "top-level array": ("pair", [PAIR, [1, 2]], 2, "<line>", "got array"),
    "top-level string": ("sft", ['"just text"'], 1, "<line>", "got string"),
    "null prompt": ("prompt", [{"prompt": None}], 1, "prompt", "null"),
    # a missing task is the default task; a null one is a mistake, not a default
    "null task": ("prompt", [{"prompt": "p"}, {"prompt": "p", "task": None}], 2, "task", "omit the field"),
    "null task in a pair": ("pair", [{**PAIR, "task": None}], 1, "task", "null"),
    # Python's json reads (and json.dump writes) NaN and Infinity; data files may not hold them
    "NaN literal in meta": ("prompt", ['{"prompt": "p", "meta": {"a": [1, {"answer": NaN}]}}'], 1, "meta.a[1].answer", "NaN"),
    "Infinity literal": ("ranked", [{**RANKED, "gold": [1.0, 2.0, 0.0]}, {**RANKED, "gold": [1, 2, float("inf")]}], 2, "gold[2]", "Infinity"),
    "-Infinity in an extra field": ("sft", ['{"prompt": "p", "response": "r", "score": -Infinity}'], 1, "score", "-Infinity"),
    "a bare NaN line": ("sft", ["NaN"], 1, "<line>", "finite"),
    "nested too deeply": ("prompt", ['{"prompt": "p", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"], 1, "<line>", "nested"),
    "prompt id empty": ("prompt", [{"prompt": "p", "id": ""}], 1, "id", "empty"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_jsonl_names_file_line_and_field(tmp_path, case):
    kind, lines, line, field, words = MALFORMED[case]
    path = write_lines(tmp_path, lines)
    with pytest.raises(DataError) as info:
        read_jsonl(path, kind)
    check_error(info.value, path, line, field)
    assert words in info.value.message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="file not found") as info:
        read_jsonl(path, "pair")
    check_error(info.value, path, None, None)


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"], ids=["empty", "blank-lines"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match="no records") as info:
        read_jsonl(path, "prompt")
    check_error(info.value, path, None, None)


def test_several_problems_reported_together(tmp_path):
    path = write_lines(tmp_path, [PAIR, "{oops", PAIR, {**PAIR, "chosen": ""}])
    with pytest.raises(DataError) as info:
        read_jsonl(path, "pair")
    err = info.value
    check_error(err, path, 2, "<line>")
    assert [(o.line, o.field) for o in err.others] == [(4, "chosen")]
    assert f"{path}:4: field 'chosen'" in str(err)


def test_error_pickles_and_is_a_value_error(tmp_path):
    err = DataError("f.jsonl", 3, "prompt", "empty string")
    copy = pickle.loads(pickle.dumps(err))
    assert isinstance(copy, ValueError)
    assert str(copy) == str(err) == "f.jsonl:3: field 'prompt': empty string"


# --------------------------------------------------------------------------- HH-RLHF


def test_hh_no_assistant_turn(tmp_path):
    path = write_lines(tmp_path, [HH, {"chosen": "\n\nHuman: hi", "rejected": HH["rejected"]}])
    with pytest.raises(DataError, match="Assistant") as info:
        read_hh_rlhf(path)
    check_error(info.value, path, 2, "chosen")


def test_hh_diverging_prompts(tmp_path):
    other = HH["rejected"].replace("a joke", "a story")
    path = write_lines(tmp_path, [HH, HH, {"chosen": HH["chosen"], "rejected": other}])
    with pytest.raises(DataError, match="differs from 'chosen'") as info:
        read_hh_rlhf(path)
    check_error(info.value, path, 3, "rejected")


def test_hh_missing_rejected(tmp_path):
    path = write_lines(tmp_path, [{"chosen": HH["chosen"]}])
    with pytest.raises(DataError, match="missing") as info:
        read_hh_rlhf(path)
    check_error(info.value, path, 1, "rejected")


def test_hh_task_defaults_to_hh_but_null_is_refused(tmp_path):
    assert read_hh_rlhf(write_lines(tmp_path, [HH]))[0]["task"] == "hh"
    path = write_lines(tmp_path, [HH, {**HH, "task": None}])
    with pytest.raises(DataError, match="null") as info:
        read_hh_rlhf(path)
    check_error(info.value, path, 2, "task")


def test_metrics_logs_may_hold_nan_data_files_may_not(tmp_path):
    from stable_rlhf.io import read_jsonl as read_log

    path = write_lines(tmp_path, [{"step": 1, "loss": float("nan"), "prompt": "p", "response": "NaN"}])
    assert math.isnan(read_log(path)[0]["loss"])  # a diverged run's metrics stay readable
    with pytest.raises(DataError, match="NaN"):
        read_jsonl(path, "sft")
    # the words themselves are fine inside strings
    assert read_jsonl(write_lines(tmp_path, [{"prompt": "NaN or Infinity?", "response": "NaN"}]), "sft")


def test_check_runs_on_every_record_with_its_location(tmp_path):
    def needs_meta(rec):
        return None if "meta" in rec else ("meta", "the check wants meta")

    good = {"prompt": "p", "meta": {}}
    path = write_lines(tmp_path, [good, {"prompt": "q"}, good, {"prompt": "r"}])
    assert len(read_jsonl(path, "prompt")) == 4
    with pytest.raises(DataError, match="the check wants meta") as info:
        load_records(str(path), "prompt", check=needs_meta)
    check_error(info.value, path, 2, "meta")
    assert [(o.line, o.field) for o in info.value.others] == [(4, "meta")]
    hh = write_lines(tmp_path, [HH], name="hh.jsonl")
    with pytest.raises(DataError) as info:
        load_records(f"hh:{hh}", "prompt", check=needs_meta)
    check_error(info.value, hh, 1, "meta")


def test_hh_multi_turn_conversion(tmp_path):
    path = write_lines(tmp_path, [HH, {**HH, "task": "harmless", "split": "test"}])
    first, second = read_hh_rlhf(path)
    assert first == {
        "prompt": HH_TURN1 + "\n\nAssistant:",
        "chosen": "Why did the chicken cross the road?",
        "rejected": "No.",
        "task": "hh",
    }
    assert second["task"] == "harmless" and second["split"] == "test"
    assert second["prompt"].count("\n\nAssistant:") == 2  # the earlier turn stays in the transcript


# --------------------------------------------------------------------------- valid data


def test_read_jsonl_round_trips_each_kind(tmp_path):
    records = {
        "prompt": [{"prompt": "p1", "task": "t", "id": "a", "meta": {"src": "x"}}],
        "pair": [PAIR],
        "ranked": [{**RANKED, "gold": [0.5, 1.0, 2.0], "meta": {}, "sft_samples": True}],
        "sft": [{"prompt": "p", "response": "r", "task": "t"}],
    }
    for kind, recs in records.items():
        assert read_jsonl(write_lines(tmp_path, recs, f"{kind}.jsonl"), kind) == recs


def test_defaults_filled_and_extra_keys_kept(tmp_path):
    path = write_lines(tmp_path, [{"prompt": "hello", "source": "web"}, {"prompt": "hello", "task": "b", "id": 7}])
    a, b = read_jsonl(path, "prompt")
    assert a["task"] == "default" and a["source"] == "web"
    assert len(a["id"]) == 16 and a["id"] == validate_record({"prompt": "hello"}, "prompt")["id"]  # stable
    assert b["id"] == "7"
    # same prompt in another task is another prompt
    assert validate_record({"prompt": "hello", "task": "b"}, "prompt")["id"] != a["id"]


def test_validate_record_drops_null_optionals_and_copies():
    rec = {"prompt": "p", "chosen": "a", "rejected": "b", "id": None, "meta": None}
    out = validate_record(rec, "pair")
    assert out == {"prompt": "p", "chosen": "a", "rejected": "b", "task": "default"}
    assert rec["meta"] is None and "task" not in rec  # input untouched
    with pytest.raises(DataError) as info:
        validate_record({"prompt": "p"}, "sft", path="x", line=5)
    check_error(info.value, "x", 5, "response")


def test_limit_and_blank_lines_and_bom_and_crlf(tmp_path):
    path = tmp_path / "d.jsonl"
    body = "\r\n".join(json.dumps({"prompt": f"p{i}", "note": "a\u2028b"}) for i in range(5))
    path.write_bytes(b"\xef\xbb\xbf" + body.replace("\r\n", "\r\n\r\n", 1).encode())
    recs = read_jsonl(path, "prompt")
    assert [r["prompt"] for r in recs] == [f"p{i}" for i in range(5)]
    assert recs[0]["note"] == "a\u2028b"  # a line separator inside a string is not a line break
    assert len(read_jsonl(path, "prompt", limit=2)) == 2


def test_pair_to_ranked():
    ranked = pair_to_ranked({**PAIR, "source": "x"})
    assert ranked == {"prompt": PAIR["prompt"], "task": "math", "source": "x", "responses": ["4", "5"], "ranking": [0, 1]}
    assert validate_record(ranked, "ranked") == ranked
    assert pair_to_ranked({"prompt": "p", "chosen": "a", "rejected": "b"})["task"] == "default"


# --------------------------------------------------------------------------- datasets and dispatch


def test_load_dataset_records_local_jsonl_with_field_map(tmp_path):
    rows = [{"question": "q1", "good": "a", "bad": "b", "extra": 1}, {"question": "q2", "good": "c", "bad": "d", "extra": 2}]
    path = write_lines(tmp_path, rows)
    recs = load_dataset_records(str(path), "pair", field_map={"question": "prompt", "good": "chosen", "bad": "rejected"})
    assert recs == [
        {"prompt": "q1", "chosen": "a", "rejected": "b", "extra": 1, "task": "default"},
        {"prompt": "q2", "chosen": "c", "rejected": "d", "extra": 2, "task": "default"},
    ]


def test_load_dataset_records_bad_row_names_dataset_and_row(tmp_path):
    rows = [PAIR, PAIR, {"prompt": "p", "rejected": "r", "chosen": None}]
    path = write_lines(tmp_path, rows, name="prefs.json")
    with pytest.raises(DataError) as info:
        load_dataset_records(str(path), "pair")
    check_error(info.value, f"{path}[train]", 3, "chosen")


def test_load_dataset_records_bad_row_names_source_column(tmp_path):
    path = write_lines(tmp_path, [{"q": "fine", "answer": "a"}, {"q": "  ", "answer": "b"}], name="sft.json")
    with pytest.raises(DataError, match="read as 'prompt'") as info:
        load_dataset_records(str(path), "sft", field_map={"q": "prompt", "answer": "response"})
    check_error(info.value, f"{path}[train]", 2, "q")


def test_load_dataset_records_field_map_unknown_column(tmp_path):
    path = write_lines(tmp_path, [{"prompt": "p", "response": "r"}], name="sft.json")
    with pytest.raises(DataError, match="lacks") as info:
        load_dataset_records(str(path), "sft", field_map={"question": "prompt"})
    check_error(info.value, f"{path}[train]", None, "question")


def test_load_dataset_records_missing_local_file(tmp_path):
    path = tmp_path / "missing.parquet"
    with pytest.raises(DataError, match="file not found"):
        load_dataset_records(str(path), "sft")


def test_load_dataset_records_csv_and_parquet(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["a", "b"], "response": ["x", "y"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        assert [r["response"] for r in load_records(str(tmp_path / name), "sft")] == ["x", "y"]


def test_load_records_dispatch(tmp_path, monkeypatch):
    jsonl = write_lines(tmp_path, [PAIR])
    hh = write_lines(tmp_path, [HH, HH], name="hh.jsonl")
    assert load_records(str(jsonl), "pair") == [PAIR]
    assert load_records(f"hh:{hh}", "pair")[0]["chosen"] == "Why did the chicken cross the road?"
    assert load_records(f"hh:{hh}", "ranked")[0]["ranking"] == [0, 1]
    assert len(load_records(f"hh:{hh}", "prompt")) == 1  # the repeated conversation is one prompt
    with pytest.raises(DataError, match="not 'sft'"):
        load_records(f"hh:{hh}", "sft")

    (tmp_path / "dir").mkdir()
    write_lines(tmp_path / "dir", [PAIR], name="part.json")
    assert load_records(str(tmp_path / "dir"), "pair") == [PAIR]

    calls = []
    monkeypatch.setattr("stable_rlhf.data.load_dataset_records", lambda *a, **k: calls.append(a) or [])
    load_records("hf:Anthropic/hh-rlhf:test", "pair")
    load_records("hf:org/name", "sft")
    assert calls == [("Anthropic/hh-rlhf", "pair", "test"), ("org/name", "sft", "train")]

    with pytest.raises(DataError, match="cannot tell"):
        load_records(str(tmp_path / "data.txt"), "pair")


def test_load_dataset_records_malformed_json_line_is_located(tmp_path):
    # datasets itself reports only "An error occurred"; we re-read the file to find the line.
    path = write_lines(tmp_path, [PAIR, PAIR, '{"prompt": "p", "chosen": '], name="prefs.jsonl")
    with pytest.raises(DataError, match="malformed JSON") as info:
        load_dataset_records(str(path), "pair")
    check_error(info.value, path, 3, "<line>")


def test_load_dataset_records_refuses_null_tasks_and_non_finite_numbers(tmp_path):
    # datasets gives null for a column some rows lack: a row without a task in a file
    # where others have one is refused, not silently given the default task
    mixed = write_lines(tmp_path, [{"prompt": "a", "task": "code"}, {"prompt": "b"}], name="mixed.json")
    with pytest.raises(DataError, match="give every row a task") as info:
        load_records(str(mixed), "prompt")
    check_error(info.value, f"{mixed}[train]", 2, "task")
    # datasets' JSON reader accepts NaN; we do not
    nan = write_lines(tmp_path, [{"prompt": "a", "meta": {"x": 1.0}}, '{"prompt": "b", "meta": {"x": NaN}}'], name="nan.json")
    with pytest.raises(DataError, match="NaN") as info:
        load_records(str(nan), "prompt")
    check_error(info.value, f"{nan}[train]", 2, "meta.x")
    info_col = write_lines(tmp_path, ['{"prompt": "b", "info": {"x": -Infinity}}'], name="info.json")
    with pytest.raises(DataError, match="read as 'meta'") as info:
        load_dataset_records(str(info_col), "prompt", field_map={"info": "meta"})
    check_error(info.value, f"{info_col}[train]", 1, "info.x")  # the user's column, not our name for it


def test_load_dataset_records_unreachable_hub_is_a_data_error():
    with pytest.raises(DataError, match="datasets could not load it") as info:
        load_dataset_records("no-such-org/no-such-dataset", "pair", split="test")
    check_error(info.value, "no-such-org/no-such-dataset[test]", None, None)


def test_a_file_listed_in_sha256sums_must_match_its_digest(tmp_path):
    import hashlib

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Say hi."}\n')
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "SHA256SUMS").write_text(f"{digest}  prompts.jsonl\n")
    assert read_jsonl(path, "prompt")[0]["prompt"] == "Say hi."
    path.write_text('{"prompt": "Say bye."}\n')  # edited after the checksum was taken
    with pytest.raises(DataError, match=r"prompts.jsonl: does not match its sha256 in .*SHA256SUMS"):
        read_jsonl(path, "prompt")
    (tmp_path / "SHA256SUMS").write_text(f"{digest}  other.jsonl\n")  # not listed: not checked
    assert read_jsonl(path, "prompt")[0]["prompt"] == "Say bye."
