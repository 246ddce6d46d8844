"""What the network sends ends up in the CDR: undecodable bytes in a From (kept by the SIP parser as surrogates)
must not kill the CDR writer thread (found by the live fuzz run: every later CDR row was lost)."""

from __future__ import annotations

from pathlib import Path

from gateway.store.cdr import CdrStore, get_call


def test_surrogates_are_stored_escaped_and_the_writer_goes_on(tmp_path: Path) -> None:
    store = CdrStore(tmp_path)
    store.open_call("v1", "inbound", **{"from": "ab\udcffcd", "to": "155501"})
    store.event("v1", "disconnected", reason="bye\udcff")
    store.open_call("v2", "inbound", **{"from": "15551230000", "to": "155501"})
    store.event("v2", "answered")
    store.flush()
    store.close()
    first, second = get_call(tmp_path, "v1"), get_call(tmp_path, "v2")
    assert first is not None and first["from_number"] == "ab\\udcffcd" and first["reason"] == "bye\\udcff"
    assert second is not None and second["state"] == "answered"


def test_a_cdr_from_an_older_version_gains_the_transport_and_encryption_columns(tmp_path: Path) -> None:
    import sqlite3

    old = sqlite3.connect(tmp_path / "cdr.sqlite")
    old.execute("CREATE TABLE calls (voice_id TEXT PRIMARY KEY, direction TEXT NOT NULL, from_number TEXT, "
                "to_number TEXT, did TEXT, trunk TEXT, project TEXT, worker TEXT, state TEXT NOT NULL, "
                "started_at REAL NOT NULL, answered_at REAL, ended_at REAL, sip_code INTEGER, reason TEXT, room_id TEXT)")
    old.execute("INSERT INTO calls (voice_id, direction, state, started_at) VALUES ('old', 'inbound', 'disconnected', 1)")
    old.commit()
    old.close()
    store = CdrStore(tmp_path)
    store.open_call("new", "inbound", transport="tls")
    store.event("new", "answered", media_encryption="srtp")
    store.flush()
    store.close()
    before, after = get_call(tmp_path, "old"), get_call(tmp_path, "new")
    assert before is not None and before["transport"] is None and before["media_encryption"] is None
    assert after is not None and (after["transport"], after["media_encryption"]) == ("tls", "srtp")
