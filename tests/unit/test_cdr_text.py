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
