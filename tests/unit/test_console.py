"""The console's CSV export (quoting, formula injection), its number masking and the CDR search it runs."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from types import SimpleNamespace

from gateway.api.console import CSV_COLUMNS, Console, csv_cell, to_csv
from gateway.store.cdr import CdrStore, search_calls


def test_cells_a_spreadsheet_would_run_as_formulas_start_with_a_quote() -> None:
    for text in ("=1+2", "+15551234567", "-2", "@SUM(A1)", "\t=1", "\r=1"):
        assert csv_cell(text) == "'" + text
    assert csv_cell("15551234567") == "15551234567"
    assert csv_cell(None) == "" and csv_cell(0) == "0" and csv_cell("") == ""


def test_csv_quotes_commas_quotes_and_newlines_and_reads_back() -> None:
    row = {"voice_id": "v1", "reason": 'said "hi", then\nleft', "from": "=HYPERLINK(\"http://x\")", "to": "+1555"}
    text = to_csv([row])
    assert text.startswith(",".join(CSV_COLUMNS) + "\r\n")
    back = list(csv.DictReader(io.StringIO(text, newline="")))
    assert back[0]["reason"] == 'said "hi", then\nleft' and back[0]["from"] == "'=HYPERLINK(\"http://x\")"
    assert back[0]["to"] == "'+1555" and back[0]["voice_id"] == "v1"


def test_the_other_party_is_masked_and_the_gateways_own_number_is_not() -> None:
    c = SimpleNamespace(keep=4, _mask=lambda n: Console._mask(c, n))  # type: ignore[arg-type]
    assert Console._numbers(c, "inbound", "+15551234567", "15550100001") == {  # type: ignore[arg-type]
        "from": "•••••••4567", "to": "15550100001"}
    assert Console._numbers(c, "outbound", "15550100001", "+4930123456") == {  # type: ignore[arg-type]
        "from": "15550100001", "to": "••••••3456"}
    c.keep = 0
    assert Console._mask(c, "+15551234567") == "•••"  # type: ignore[arg-type]


def test_search_filters_and_pages(tmp_path: Path) -> None:
    store = CdrStore(tmp_path, worker="w1")
    try:
        store.open_call("a", "inbound", **{"from": "15551110000", "to": "15550100001", "did": "15550100001", "project": "demo"})
        store.event("a", "disconnected", reason="remote_bye", code=200)
        store.open_call("b", "outbound", **{"from": "15550100001", "to": "4930123456", "project": "acme"})
        store.open_call("c", "inbound", **{"from": "100%_x", "to": "15550100001", "did": "15550100001", "project": "demo"})
        store.flush()
    finally:
        store.close()
    ids = lambda **kw: [r["voice_id"] for r in search_calls(tmp_path, **kw)[0]]  # noqa: E731
    assert sorted(ids()) == ["a", "b", "c"]
    assert ids(number="1110") == ["a"] and ids(number="4930") == ["b"]
    assert ids(number="%") == ["c"] and ids(number="_") == ["c"]  # LIKE's wildcards are plain characters here
    assert sorted(ids(project="demo")) == ["a", "c"] and ids(state="disconnected", reason="remote_bye") == ["a"]
    assert ids(since=time.time() + 60) == [] and sorted(ids(until=time.time() + 60)) == ["a", "b", "c"]
    rows, total = search_calls(tmp_path, limit=2, offset=2)
    assert total == 3 and len(rows) == 1
