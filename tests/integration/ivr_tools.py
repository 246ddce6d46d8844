"""Build sipp IVR-caller scenarios: keypad input by RFC 4733 (play_dtmf), SIP INFO, or in-band tones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gateway.media import g711
from gateway.media.dtmf import COLS, KEYPAD, ROWS
from tests.conftest import scenario

CALLER_BYE = """  <pause milliseconds="%(tail)d"/>
  <send retrans="500"><![CDATA[
BYE sip:gateway@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
From: <sip:%(caller)s@[local_ip]:[local_port]>;tag=[pid]ivr[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
Call-ID: [call_id]
CSeq: 99 BYE
Max-Forwards: 70
Content-Length: 0
]]></send>
  <recv response="200"/>"""

def reply(status_line: str) -> str:
    """A sipp <send> answering the last request received (headers copied from it)."""
    return f"""  <send><![CDATA[
SIP/2.0 {status_line}
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0
]]></send>"""


GATEWAY_BYE = '  <recv request="BYE" timeout="%(tail)d"/>\n' + reply("200 OK")

INFO = """  <send retrans="500"><![CDATA[
INFO sip:gateway@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
From: <sip:%(caller)s@[local_ip]:[local_port]>;tag=[pid]ivr[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
Call-ID: [call_id]
CSeq: %(cseq)d INFO
Max-Forwards: 70
Content-Type: application/dtmf-relay
Content-Length: [len]

Signal=%(digit)s
Duration=160
]]></send>
  <recv response="200"/>
  <pause milliseconds="250"/>"""


def rfc4733(keys: str) -> str:
    """play_dtmf: PT 96, 200 ms digits 400 ms apart, a new SSRC per burst (sipp 3.6.1)."""
    return f'  <nop><action><exec play_dtmf="{keys}"/></action></nop>\n  <pause milliseconds="{600 * len(keys) + 800}"/>'


def info(keys: str, caller: str, first_cseq: int) -> str:
    return "\n".join(INFO % {"caller": caller, "cseq": first_cseq + i, "digit": d} for i, d in enumerate(keys))


def tones_ulaw(path: Path, keys: str, lead_ms: int = 600, on_ms: int = 120, off_ms: int = 120) -> Path:
    parts = [np.zeros(8 * lead_ms)]
    t = np.arange(8 * on_ms) / 8000
    for key in keys:
        r = next(i for i, row in enumerate(KEYPAD) if key in row)
        c = KEYPAD[r].index(key)
        parts += [5000 * (np.sin(2 * np.pi * ROWS[r] * t) + np.sin(2 * np.pi * COLS[c] * t)), np.zeros(8 * off_ms)]
    path.write_bytes(g711.encode("PCMU", np.concatenate(parts).astype(np.int16)))
    return path


def inband(path: Path, keys: str) -> str:
    tones_ulaw(path, keys)
    return f'  <nop><action><exec rtp_stream="{path},1,0"/></action></nop>\n  <pause milliseconds="{240 * len(keys) + 1400}"/>'


def ivr_scenario(tmp: Path, steps: list[str], caller: str = "15551230000", end: str = "caller", tail: int = 2500) -> Path:
    end_xml = (CALLER_BYE if end == "caller" else GATEWAY_BYE) % {"caller": caller, "tail": tail}
    return scenario(tmp, "ivr_caller.xml", input="\n".join(steps), end=end_xml, caller=caller)


def heard_by_caller(gw: Any, tmp: Path, number: str, pause_ms: int, port_offset: int = 0) -> np.ndarray:
    """A sipp caller dials `number`, listens `pause_ms` and hangs up; what it heard (the gateway's RTP captured on
    the wire by tshark, decoded in arrival order)."""
    from gateway.media.rtp import RtpPacket
    from tests.conftest import run_sipp
    from tests.integration.media_tools import Capture

    media_port = 42000 + (gw.sip_port % 1000) * 2 + port_offset
    lo, hi = gw.rtp_range
    cap = Capture(tmp / f"heard-{number}.pcap", f"udp and dst port {media_port} and src portrange {lo}-{hi}")
    try:
        sf = ivr_scenario(tmp, [f'  <pause milliseconds="{pause_ms}"/>'], tail=0)
        r = run_sipp(gw.sip, "-sf", str(sf), "-s", number, "-m", "1", media_port=media_port)
        assert r.returncode == 0, r.stdout[-2000:]
    finally:
        cap.stop()
    payload = b"".join(RtpPacket.parse(p).payload for _, _, _, p in cap.udp_payloads())
    return g711.decode("PCMU", payload).astype(float)  # type: ignore[no-any-return]
