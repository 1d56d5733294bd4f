"""Data records, readers and validation: every bad input is found before anything trains.

Four record kinds, all plain JSON-serialisable dicts (extra keys are kept, so
researchers can carry their own metadata through the pipeline):

    prompt  {"prompt", "task"?, "id"?, "meta"?}               PPO / selection prompts
    pair    {"prompt", "chosen", "rejected", "task"?}         preference pairs
    ranked  {"prompt", "responses", "ranking", "task"?,       K-way comparisons; ranking
             "gold"?, "meta"?, "sft_samples"?}                lists indices best-first
    sft     {"prompt", "response", "task"?}                   demonstrations

Readers: ``read_jsonl`` (our native format), ``read_hh_rlhf`` (Anthropic HH-RLHF
transcripts), ``load_dataset_records`` (anything the ``datasets`` library loads) and
``load_records``, the one entry point configs use. Every problem is a ``DataError``
whose message starts ``<file>:<line>: field '<field>':`` so the user can jump to it;
a reader reports up to ``MAX_PROBLEMS`` problems at once, so one run fixes a file.

Strict where a silent default would corrupt a result: a NaN or Infinity literal
anywhere in a JSONL line is refused (Python's json accepts them), and so is an explicit
``"task": null`` (a missing task means the default task; a null one is a mistake). A
caller that needs more of a record (the gold reward needs a testbed task and its meta)
passes a ``check`` that runs on every record with its location.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

Kind = Literal["prompt", "pair", "ranked", "sft"]
KINDS = ("prompt", "pair", "ranked", "sft")
DEFAULT_TASK = "default"
HH_TASK = "hh"
MAX_PROBLEMS = 10  # enough to show a pattern, few enough to read

# The text fields each kind requires, checked in this order (so errors come out in
# the order a reader of the record would meet them).
_REQUIRED_TEXT = {
    "prompt": ("prompt",),
    "pair": ("prompt", "chosen", "rejected"),
    "ranked": ("prompt",),
    "sft": ("prompt", "response"),
}

# Optional fields; null counts as absent (datasets gives null for a column some rows lack),
# except for task: a null task is refused rather than read as the default task.
_OPTIONAL = ("id", "meta", "gold", "sft_samples")
_NULL_TASK = ("is null; omit the field for the default task (in a dataset, rows that lack a column "
              "read as null: give every row a task, or none)")

# A caller's extra check of a validated record: its first problem as (field, message), or None.
RecordCheck = Callable[[dict], "tuple[str, str] | None"]

# HH-RLHF turn headers. The prompt ends with the last Assistant header, so the policy
# continues exactly where the human-preferred answer began.
_HH_ASSISTANT = "\n\nAssistant:"
_HH_HUMAN = "\n\nHuman:"

# Local files `datasets` can read, by suffix -> its packaged builder name.
_DATASETS_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """A data problem, located: ``<file>:<line>: field '<field>': <what is wrong>``.

    ``line`` is 1-based (a row index + 1 for ``datasets`` data) or None for a
    whole-file problem; ``field`` is a record key (``responses[2]`` for one element),
    ``"<line>"`` for a line that is not a record at all, or None. ``others`` holds
    further problems found in the same file; ``str()`` lists them after the first.
    """

    def __init__(self, path, line: int | None, field: str | None, message: str, others=()):
        # args are the constructor's own, so the error pickles across processes.
        super().__init__(str(path), line, field, message)
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        self.others: list[DataError] = list(others)

    def location(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return where if self.field is None else f"{where}: field '{self.field}'"

    def __str__(self) -> str:
        text = f"{self.location()}: {self.message}"
        if self.others:
            text += f"\n  {len(self.others)} more problem(s):"
            text += "".join(f"\n  {o.location()}: {o.message}" for o in self.others)
            if len(self.others) + 1 >= MAX_PROBLEMS:
                text += f"\n  (stopped after {MAX_PROBLEMS} problems)"
        return text


# --------------------------------------------------------------------------- validation


def _json_type(value: Any) -> str:
    """The JSON name of a value's type: users wrote JSON, not Python."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "boolean"
    for py, name in ((str, "string"), (int, "integer"), (float, "number"), (dict, "object"), (list, "array")):
        if isinstance(value, py):
            return name
    return type(value).__name__


def _check_text(value: Any, field: str, fail: Callable[..., DataError]) -> str:
    if not isinstance(value, str):
        raise fail(field, f"expected a string, got {_json_type(value)}")
    if not value.strip():
        raise fail(field, "empty string" if not value else "whitespace-only string")
    if "\x00" in value:
        # A NUL is binary garbage in text, and C-level tokenizers may cut the string there.
        raise fail(field, f"contains a NUL character at index {value.index(chr(0))}")
    return value


def _required(rec: dict, field: str, fail) -> Any:
    # datasets fills a column missing from some rows with None: that is "missing" too.
    if rec.get(field) is None:
        raise fail(field, "missing required field" if field not in rec else "is null; a value is required")
    return rec[field]


def _check_list(value: Any, field: str, fail) -> list:
    if not isinstance(value, list):
        raise fail(field, f"expected an array, got {_json_type(value)}")
    return value


def validate_record(rec: dict, kind: Kind, path="<memory>", line: int | None = None,
                    check: RecordCheck | None = None) -> dict:
    """Check one record of ``kind``; return a normalised copy with defaults filled.

    Defaults: ``task`` -> "default" when absent (a null task is refused); prompt ``id``
    -> a stable hash of task and prompt. Other optional fields that are null count as
    absent and are dropped (``datasets`` gives null for a column some rows lack).
    ``check`` then looks at the normalised record. Raises ``DataError`` at the first
    problem.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")

    def fail(field: str, message: str) -> DataError:
        return DataError(path, line, field, message)

    if not isinstance(rec, dict):
        raise fail("<line>", f"expected a JSON object, got {_json_type(rec)}")
    out = {k: v for k, v in rec.items() if v is not None or k not in _OPTIONAL}
    for field in _REQUIRED_TEXT[kind]:
        _check_text(_required(rec, field, fail), field, fail)

    if "task" in rec and rec["task"] is None:
        raise fail("task", _NULL_TASK)
    out["task"] = _check_text(out["task"], "task", fail) if "task" in out else DEFAULT_TASK
    if "meta" in out and not isinstance(out["meta"], dict):
        raise fail("meta", f"expected an object, got {_json_type(out['meta'])}")

    if kind == "pair" and rec["chosen"].strip() == rec["rejected"].strip():
        # A preference between identical texts carries no signal, only label noise.
        raise fail("rejected", "identical to 'chosen' (after stripping whitespace)")
    if kind == "ranked":
        _validate_ranked(out, fail)
    if kind == "prompt":
        out["id"] = _prompt_id(out, fail)
    problem = check(out) if check is not None else None
    if problem is not None:
        raise fail(*problem)
    return out


def _validate_ranked(out: dict, fail) -> None:
    responses = _check_list(_required(out, "responses", fail), "responses", fail)
    k = len(responses)
    if k < 2:
        raise fail("responses", f"a comparison needs at least 2 responses, got {k}")
    seen: dict[str, int] = {}
    for i, text in enumerate(responses):
        key = _check_text(text, f"responses[{i}]", fail).strip()
        if key in seen:
            # Identical texts ranked apart would teach the model to score noise.
            raise fail(f"responses[{i}]", f"duplicates responses[{seen[key]}] (identical after stripping whitespace)")
        seen[key] = i

    ranking = _check_list(_required(out, "ranking", fail), "ranking", fail)
    if len(ranking) != k:
        raise fail("ranking", f"has {len(ranking)} entries but there are {k} responses")
    for i, idx in enumerate(ranking):
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise fail(f"ranking[{i}]", f"expected an integer response index, got {_json_type(idx)}")
        if not 0 <= idx < k:
            raise fail(f"ranking[{i}]", f"index {idx} is out of range 0..{k - 1}")
    if len(set(ranking)) != k:
        twice = next(idx for idx in ranking if ranking.count(idx) > 1)
        raise fail("ranking", f"not a permutation of 0..{k - 1}: index {twice} appears more than once")

    if "gold" in out:
        gold = _check_list(out["gold"], "gold", fail)
        if len(gold) != k:
            raise fail("gold", f"has {len(gold)} entries but there are {k} responses")
        for i, g in enumerate(gold):
            if isinstance(g, bool) or not isinstance(g, (int, float)):
                raise fail(f"gold[{i}]", f"expected a number, got {_json_type(g)}")
            if not math.isfinite(g):  # Python's json reads NaN and Infinity literals
                raise fail(f"gold[{i}]", f"not a finite number: {g}")
        out["gold"] = [float(g) for g in gold]
    if "sft_samples" in out and not isinstance(out["sft_samples"], bool):
        raise fail("sft_samples", f"expected a boolean, got {_json_type(out['sft_samples'])}")


def _prompt_id(out: dict, fail) -> str:
    given = out.get("id")
    if given is None:
        # Stable across runs and machines (unlike hash()); NUL cannot occur in
        # validated text, so it separates task and prompt unambiguously.
        digest = hashlib.sha256(f"{out['task']}\x00{out['prompt']}".encode("utf-8")).hexdigest()
        return digest[:16]
    if isinstance(given, int) and not isinstance(given, bool):
        return str(given)  # integer ids are common in hub datasets; we key by string
    return _check_text(given, "id", fail)


def ranks_of(ranking: list[int]) -> list[int]:
    """Position of each response in a best-first ranking: ranks_of([2, 0, 1]) == [1, 2, 0]."""
    ranks = [0] * len(ranking)
    for pos, idx in enumerate(ranking):
        ranks[idx] = pos
    return ranks


def pair_to_ranked(pair: dict) -> dict:
    """A preference pair as a K=2 ranked record (chosen is response 0 and ranked first)."""
    out = {k: v for k, v in pair.items() if k not in ("chosen", "rejected")}
    out["responses"] = [pair["chosen"], pair["rejected"]]
    out["ranking"] = [0, 1]
    out.setdefault("task", DEFAULT_TASK)
    return out


# --------------------------------------------------------------------------- JSONL files


CHECKSUMS = "SHA256SUMS"


def _read_bytes(path) -> bytes:
    p = Path(path)
    if p.is_dir():
        raise DataError(path, None, None, "is a directory, expected a JSONL file")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, None, "file not found") from None
    except OSError as e:
        raise DataError(path, None, None, f"cannot read file: {e.strerror or e}") from None
    _verify_checksum(p, data)
    return data


def _verify_checksum(path: Path, data: bytes) -> None:
    """A file listed in a ``SHA256SUMS`` beside it (the shipped data) must match its digest:
    a damaged or hand-edited copy would otherwise train and score silently."""
    sums = path.parent / CHECKSUMS
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if name.lstrip("*") == path.name and hashlib.sha256(data).hexdigest() != digest:
            raise DataError(path, None, None, f"does not match its sha256 in {sums} (the file was changed "
                            "or damaged): rebuild it (bash data/regenerate.sh --write for data/testbed), or "
                            "remove its line from SHA256SUMS if the change is intended")


def _raw_lines(path) -> Iterator[tuple[int, tuple[bytes, int]]]:
    """Yield (line number, (raw bytes, file offset)) for each non-blank line.

    We split the bytes on b"\\n" ourselves: str.splitlines() would also split on
    U+2028 and friends, which are legal inside JSON strings, and would shift line
    numbers; decoding per line lets a bad byte be reported with its line.
    """
    data = _read_bytes(path)
    offset = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # Windows editors write a BOM
    for number, raw in enumerate(data[offset:].split(b"\n"), start=1):
        if raw.strip():
            yield number, (raw, offset)
        offset += len(raw) + 1


class _NonFiniteLiteral(str):
    """What a data line's NaN, Infinity or -Infinity literal is read as, so that
    ``_parse_line`` can refuse it and say in which field it was. (Our own metrics logs,
    read by ``io.read_jsonl``, may hold NaN; data files may not.)"""


def _non_finite_field(obj: Any) -> tuple[str, str] | None:
    """(field, literal) of the first non-finite number in a parsed record, a
    ``_NonFiniteLiteral`` or a float (``datasets`` reads NaN from .json files, and a CSV's
    empty numeric cell as NaN), in document order (``gold[1]``, ``meta.answer``;
    ``<line>`` for the whole line), or None. Iterative: a deeply nested line that json
    could read must not overflow us."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, _NonFiniteLiteral):
            return where or "<line>", str(value)
        if isinstance(value, float) and not math.isfinite(value):
            return where or "<line>", "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
        if isinstance(value, dict):
            stack.extend((f"{where}.{k}" if where else k, v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return None


def _refuse_non_finite(obj: Any, path, line: int | None) -> None:
    found = _non_finite_field(obj)
    if found is not None:
        field, literal = found
        raise DataError(path, line, field, f"{literal} is not a finite number: data hold numbers or null "
                                           "(Python's json.dump writes NaN and Infinity; pandas reads an empty cell as NaN)")


def _parse_line(path, line: int, raw: bytes, offset: int) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            path, line, "<line>",
            f"not valid UTF-8: byte {raw[e.start:e.start + 1]!r} at byte offset {e.start} of the line "
            f"(offset {offset + e.start} in the file)",
        ) from None
    try:
        obj = json.loads(text, parse_constant=_NonFiniteLiteral)
    except json.JSONDecodeError as e:
        raise DataError(path, line, "<line>", f"malformed JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(path, line, "<line>", "malformed JSON: nested too deeply to read") from None
    if "NaN" in text or "Infinity" in text:  # skips the walk for the usual line with neither word
        _refuse_non_finite(obj, path, line)
    return obj


def _collect(path, rows: Iterable[tuple[int, Any]], convert: Callable[[int, Any], dict],
             limit: int | None = None, empty: str = "no records (the file is empty or all blank)") -> list[dict]:
    """Convert every row, gathering up to MAX_PROBLEMS DataErrors; raise them together."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of records or None, got {limit}")
    records: list[dict] = []
    problems: list[DataError] = []
    for line, row in rows:
        try:
            records.append(convert(line, row))
        except DataError as e:
            problems.append(e)
            if len(problems) >= MAX_PROBLEMS:
                break
        if limit is not None and len(records) + len(problems) >= limit:
            break
    if problems:
        first = problems[0]
        raise DataError(first.path, first.line, first.field, first.message, others=problems[1:])
    if not records:
        raise DataError(path, None, None, empty)
    return records


def read_jsonl(path, kind: Kind, limit: int | None = None, check: RecordCheck | None = None) -> list[dict]:
    """Read and validate a JSONL file of ``kind`` records (at most ``limit`` of them),
    each also passing ``check`` if given."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")

    def convert(line: int, raw: tuple[bytes, int]) -> dict:
        return validate_record(_parse_line(path, line, *raw), kind, path, line, check)

    return _collect(path, _raw_lines(path), convert, limit)


# --------------------------------------------------------------------------- HH-RLHF


def _hh_to_pair(obj: Any, path, line: int, check: RecordCheck | None = None) -> dict:
    """One HH-RLHF line {"chosen": transcript, "rejected": transcript} -> a pair record."""

    def fail(field: str, message: str) -> DataError:
        return DataError(path, line, field, message)

    if not isinstance(obj, dict):
        raise fail("<line>", f"expected a JSON object, got {_json_type(obj)}")
    cuts = {}
    for field in ("chosen", "rejected"):
        text = _check_text(_required(obj, field, fail), field, fail)
        cut = text.rfind(_HH_ASSISTANT)
        if cut < 0:
            raise fail(field, "no '\\n\\nAssistant:' turn; an HH-RLHF transcript ends with the Assistant turn being compared")
        cuts[field] = cut + len(_HH_ASSISTANT)
        if _HH_HUMAN in text[cuts[field]:]:
            raise fail(field, "a Human turn follows the last Assistant turn; the transcript must end with the Assistant's answer")
    chosen, rejected = obj["chosen"], obj["rejected"]
    prompt = chosen[: cuts["chosen"]]
    if rejected[: cuts["rejected"]] != prompt:
        other = rejected[: cuts["rejected"]]
        at = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b), min(len(prompt), len(other)))
        raise fail("rejected", f"differs from 'chosen' at character {at}, before the last Assistant turn; "
                               "both transcripts must share the same conversation up to the compared answers")
    pair = {k: v for k, v in obj.items() if k not in ("chosen", "rejected")}
    pair.update(prompt=prompt, chosen=chosen[cuts["chosen"]:].strip(), rejected=rejected[cuts["rejected"]:].strip())
    if "task" not in pair:  # a null task is refused, as everywhere
        pair["task"] = HH_TASK
    return validate_record(pair, "pair", path, line, check)


def read_hh_rlhf(path, check: RecordCheck | None = None) -> list[dict]:
    """Read an HH-RLHF JSONL file into pair records.

    The prompt is the whole conversation up to and including the last
    "\\n\\nAssistant:" header (a transcript, kept verbatim); chosen and rejected are
    the final assistant turns, stripped. ``task`` is "hh" unless the line has one.
    Each pair also passes ``check`` if given.
    """
    return _collect(path, _raw_lines(path),
                    lambda line, raw: _hh_to_pair(_parse_line(path, line, *raw), path, line, check))


# --------------------------------------------------------------------------- datasets


def _looks_local(name: str) -> bool:
    return Path(name).suffix.lower() in _DATASETS_BUILDERS or name.startswith((".", "/", "~"))


def _is_json_lines(name: str) -> bool:
    """A local .jsonl file, or a .json file whose first line is a whole JSON object."""
    path = Path(name).expanduser()
    if not path.is_file() or path.suffix.lower() not in (".json", ".jsonl"):
        return False
    if path.suffix.lower() == ".jsonl":
        return True
    with open(path, "rb") as f:
        first = next((raw for raw in f if raw.strip()), b"")
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return False


def _load_hf(name_or_path: str, split: str, data_files, revision, label: str):
    import datasets  # heavy import (~1.5 s), only when a dataset is actually loaded

    path = Path(name_or_path).expanduser()
    if not path.exists() and _looks_local(name_or_path):
        # Without this, datasets would try the hub and report a network error instead.
        raise DataError(name_or_path, None, None, "file not found")
    try:
        if path.is_file():
            builder = _DATASETS_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(name_or_path, None, None, f"datasets cannot read '{path.suffix}' files; use one of {sorted(_DATASETS_BUILDERS)}")
            return datasets.load_dataset(builder, data_files=str(path), split=split)
        return datasets.load_dataset(str(path) if path.is_dir() else name_or_path,
                                     data_files=data_files, split=split, revision=revision)
    except DataError:
        raise
    except Exception as e:
        # datasets raises many unrelated types here (FileNotFoundError, DatasetNotFoundError,
        # ValueError for an unknown split, Arrow errors for mixed column types); all of
        # them mean "this data cannot be used", so give them one type and a location.
        raise DataError(label, None, None, f"datasets could not load it: {type(e).__name__}: {e}") from e


def _check_field_map(field_map: dict, columns: list[str], label: str) -> None:
    targets: dict[str, str] = {}
    for old, new in field_map.items():
        if not isinstance(old, str) or not isinstance(new, str):
            raise DataError(label, None, str(old), f"field_map entries must map column names to field names, got {old!r}: {new!r}")
        if old not in columns:
            raise DataError(label, None, old, f"field_map names column '{old}', which the dataset lacks (columns: {columns})")
        if new in columns and new not in field_map:
            raise DataError(label, None, old, f"field_map renames '{old}' to '{new}' but the dataset already has a '{new}' column")
        if new in targets:
            raise DataError(label, None, old, f"field_map renames both '{targets[new]}' and '{old}' to '{new}'")
        targets[new] = old


def load_dataset_records(name_or_path: str, kind: Kind, split: str = "train", data_files=None,
                         field_map: dict | None = None, revision=None, check: RecordCheck | None = None) -> list[dict]:
    """Load any ``datasets`` dataset (hub id, local directory, or a .json/.jsonl/.csv/.parquet
    file) and validate each row as a ``kind`` record.

    ``field_map`` renames the dataset's columns to our field names, e.g.
    ``{"question": "prompt"}``. Errors are located as ``<name>[<split>]:<row + 1>`` and
    name the dataset's own column. Each record also passes ``check`` if given.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    label = f"{name_or_path}[{split}]"
    field_map = dict(field_map or {})
    source = {new: old for old, new in field_map.items()}

    def convert(where: str, line: int, row: Any) -> dict:
        if isinstance(row, dict):
            row = {field_map.get(k, k): v for k, v in row.items()}
        try:
            _refuse_non_finite(row, where, line)
            return validate_record(row, kind, where, line, check)
        except DataError as e:
            field = e.field or ""
            base = re.match(r"[^.\[]*", field).group()  # "responses" of "responses[2]", "meta" of "meta.x"
            if base not in source:
                raise
            # Point at the column the user sees in their data, not our name for it.
            raise DataError(e.path, e.line, source[base] + field[len(base):],
                            f"{e.message} (column '{source[base]}' is read as '{base}')") from None

    try:
        ds = _load_hf(name_or_path, split, data_files, revision, label)
    except DataError as e:
        if e.__cause__ is not None and _is_json_lines(name_or_path):
            # datasets reports a bad line of a JSON Lines file without its line number
            # (or as an Arrow type clash); read it ourselves to name the line and field.
            local = Path(name_or_path).expanduser()
            _collect(local, _raw_lines(local),
                     lambda line, raw: convert(str(local), line, _parse_line(local, line, *raw)))
        raise
    _check_field_map(field_map, list(ds.column_names), label)
    rows = ((i + 1, row) for i, row in enumerate(ds))
    return _collect(label, rows, lambda line, row: convert(label, line, row), empty="no rows in this dataset split")


# --------------------------------------------------------------------------- entry point


def _hh_as(kind: Kind, pairs: list[dict], spec: str) -> list[dict]:
    if kind == "pair":
        return pairs
    if kind == "ranked":
        return [pair_to_ranked(p) for p in pairs]
    if kind == "prompt":
        # HH repeats some conversations across pairs; a prompt set lists each once, so
        # that ids stay unique (selection and evaluation key prompts by id).
        prompts: dict[str, dict] = {}
        for p in pairs:
            rec = validate_record({k: v for k, v in p.items() if k not in ("chosen", "rejected")}, "prompt", spec)
            prompts.setdefault(rec["id"], rec)
        return list(prompts.values())
    raise DataError(spec, None, None, f"HH-RLHF data are preference pairs: load them as kind 'pair', 'ranked' or 'prompt', not {kind!r}")


def load_records(spec: str, kind: Kind, check: RecordCheck | None = None) -> list[dict]:
    """Load ``kind`` records from a config's data spec, each also passing ``check`` if given
    (its problems located like any other):

    ``path.jsonl``         our JSONL format (``read_jsonl``)
    ``hh:path.jsonl``      HH-RLHF transcripts (pairs; also as kind "ranked" or "prompt")
    ``hf:name[:split]``    a hub dataset through ``datasets`` (split defaults to train)
    ``dir/`` or ``.json``/``.csv``/``.parquet``   local files through ``datasets``
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    spec = str(spec)
    if spec.startswith("hh:"):
        return _hh_as(kind, read_hh_rlhf(spec[3:], check), spec)
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        if not name:
            raise DataError(spec, None, None, "no dataset name after 'hf:'; expected 'hf:<name>[:split]'")
        return load_dataset_records(name, kind, split or "train", check=check)
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path, kind, check=check)
    if path.is_dir() or suffix in (".json", ".csv", ".parquet"):
        return load_dataset_records(spec, kind, check=check)
    raise DataError(spec, None, None, "cannot tell the data format; use a .jsonl file, 'hh:<file>', "
                                      "'hf:<name>[:split]', a directory, or a .json/.csv/.parquet file")
