"""Unit tests of the SIP hardening pieces: digest nonce binding, counts, expiry and uri; flood limiter; framing."""

from __future__ import annotations

from gateway.sip.auth import Credentials, DigestClient, DigestServer, parse_auth_header, uri_matches
from gateway.sip.flood import LogThrottle, SourceLimiter
from gateway.sip.framing import StreamFramer

URI = "sip:15550100001@127.0.0.1:5060"
USERS = {"trunk": "pw"}


def answer(server: DigestServer, source: str, now: float = 1000.0, uri: str = URI, stale: bool = False
           ) -> tuple[DigestClient, str]:
    challenge = server.challenges(now=now, source=source, stale=stale)[0]
    client = DigestClient(Credentials("trunk", "pw"))
    return client, client.authorization(challenge, "INVITE", uri)


def test_nonce_count_must_grow_and_a_replay_is_stale() -> None:
    server = DigestServer("gateway", secret=b"k" * 32)
    challenge = server.challenges(now=1000, source="192.0.2.1")[1]
    client = DigestClient(Credentials("trunk", "pw"))
    first = client.authorization(challenge, "INVITE", URI)
    assert server.check(first, "INVITE", USERS, 1001, "192.0.2.1", URI).user == "trunk"
    replay = server.check(first, "INVITE", USERS, 1002, "192.0.2.1", URI)
    assert (replay.user, replay.status, replay.stale, replay.reason) == (None, 401, True, "nonce_count_reused")
    second = client.authorization(challenge, "INVITE", URI)  # nc=00000002 with the same nonce: fine
    assert server.check(second, "INVITE", USERS, 1003, "192.0.2.1", URI).user == "trunk"
    assert server.check(first, "INVITE", USERS, 1004, "192.0.2.1", URI).stale  # going back is a replay too


def test_nonce_is_bound_to_the_address_it_was_sent_to() -> None:
    server = DigestServer("gateway", secret=b"k" * 32)
    _, auth = answer(server, "192.0.2.1")
    other = server.check(auth, "INVITE", USERS, 1001, "192.0.2.66", URI)
    assert (other.user, other.status, other.stale, other.reason) == (None, 401, False, "nonce")
    forged = auth.replace('nonce="', 'nonce="1', 1)
    assert server.check(forged, "INVITE", USERS, 1001, "192.0.2.1", URI).reason == "nonce"
    assert server.check(auth, "INVITE", USERS, 1001, "192.0.2.1", URI).user == "trunk"
    assert DigestServer("gateway").check(auth, "INVITE", USERS, 1001, "192.0.2.1", URI).reason == "nonce"


def test_digest_uri_must_be_the_request_uri() -> None:
    server = DigestServer("gateway", secret=b"k" * 32)
    _, auth = answer(server, "192.0.2.1")
    moved = server.check(auth, "INVITE", USERS, 1001, "192.0.2.1", "sip:15550100000@127.0.0.1:5060")
    assert (moved.user, moved.status, moved.reason) == (None, 400, "uri_mismatch")
    # the same URI written differently still matches
    assert server.check(auth, "INVITE", USERS, 1001, "192.0.2.1", "SIP:15550100001@127.0.0.1:5060").user == "trunk"


def test_expired_nonce_is_stale_and_wrong_password_is_not() -> None:
    server = DigestServer("gateway", secret=b"k" * 32, lifetime=300)
    _, auth = answer(server, "192.0.2.1")
    late = server.check(auth, "INVITE", USERS, 1301, "192.0.2.1", URI)
    assert (late.status, late.stale, late.reason) == (401, True, "nonce_expired")
    wrong = server.check(auth, "INVITE", {"trunk": "other"}, 1301, "192.0.2.1", URI)
    assert (wrong.status, wrong.stale, wrong.reason) == (401, False, "response")  # stale only with a good digest
    assert 'stale=true' in server.challenges(source="192.0.2.1", stale=True)[0]


def test_nonce_without_qop_is_good_once() -> None:
    server = DigestServer("gateway", secret=b"k" * 32)
    challenge = server.challenges(now=1000, source="192.0.2.1")[0].replace(', qop="auth"', "")
    auth = DigestClient(Credentials("trunk", "pw")).authorization(challenge, "INVITE", URI)
    assert "nc=" not in auth
    assert server.check(auth, "INVITE", USERS, 1001, "192.0.2.1", URI).user == "trunk"
    assert server.check(auth, "INVITE", USERS, 1002, "192.0.2.1", URI).stale


def test_nonce_state_is_bounded_and_forgetting_never_lets_a_replay_through() -> None:
    server = DigestServer("gateway", secret=b"k" * 32, max_nonces=3)
    used = []
    for i in range(5):
        _, auth = answer(server, "192.0.2.1", now=1000 + i)
        assert server.check(auth, "INVITE", USERS, 1000 + i, "192.0.2.1", URI).user == "trunk"
        used.append(auth)
    assert len(server._counts) == 3
    # the first two were pushed out: their replays are stale, not accepted
    assert all(server.check(a, "INVITE", USERS, 1010, "192.0.2.1", URI).stale for a in used)
    _, fresh = answer(server, "192.0.2.1", now=1011)
    assert server.check(fresh, "INVITE", USERS, 1011, "192.0.2.1", URI).user == "trunk"
    _, later = answer(server, "192.0.2.1", now=2000)  # expired counts are dropped as time goes on
    assert server.check(later, "INVITE", USERS, 2000, "192.0.2.1", URI).user == "trunk"
    assert len(server._counts) == 1


def test_challenges_differ_even_within_one_second() -> None:
    server = DigestServer("gateway")
    nonces = {parse_auth_header(server.challenges(now=5, source="192.0.2.1")[0])[1]["nonce"] for _ in range(50)}
    assert len(nonces) == 50, "two callers challenged in the same second must not share a nonce count"


def test_uri_matching_rules() -> None:
    assert uri_matches(URI, URI)
    assert uri_matches("sip:15550100001@127.0.0.1:5060", "SIP:15550100001@127.0.0.1:5060;transport=udp")
    assert uri_matches("sip:127.0.0.1:5060", URI), "sipp's default: the domain, no user"
    assert uri_matches("sip:15550100001@127.0.0.1", URI), "LiveKit's: no port"
    assert not uri_matches("sip:15550100000@127.0.0.1:5060", URI), "another number"
    assert not uri_matches("sip:15550100001@127.0.0.2:5060", URI), "another host"
    assert not uri_matches("sip:15550100001@127.0.0.1:5070", URI), "another port"
    assert not uri_matches("sips:15550100001@127.0.0.1:5060", URI)
    assert not uri_matches("garbage", URI) and not uri_matches("tel:+15550100001", "tel:+15550100001;x=1")


# ---------------------------------------------------------------- flood limiter


def test_token_bucket_per_source() -> None:
    limiter = SourceLimiter(rate=10, burst=5)
    assert [limiter.allow("a", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("b", 0.0), "another source has its own bucket"
    assert limiter.allow("a", 0.1) and not limiter.allow("a", 0.1)  # 10/s: one token per 100 ms
    assert sum(limiter.allow("a", 10.0) for _ in range(20)) == 5  # refills up to the burst only
    assert limiter.dropped == 2 + 1 + 15
    # one report per source per window, with what was dropped since the last one
    assert limiter.reports == [("a", 1), ("a", 3)]  # at 0.0 the first drop; at 10.0 the 2 since and this one


def test_limiter_reports_once_per_window() -> None:
    limiter = SourceLimiter(rate=1, burst=1, log_window=10)
    allowed = sum(limiter.allow("a", i / 100) for i in range(1100))  # 100 a second for 11 s
    assert allowed == 11 and limiter.dropped == 1089
    assert limiter.reports == [("a", 1), ("a", 990)]  # two lines for 1089 drops


def test_limiter_memory_is_bounded() -> None:
    limiter = SourceLimiter(rate=1, burst=1, max_sources=100)
    for i in range(10_000):
        limiter.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter) == 100


def test_log_throttle_once_per_window() -> None:
    t = LogThrottle(window=10, max_sources=2)
    assert t.due("a", 0) == 1
    assert [t.due("a", s) for s in (1, 2, 9.9)] == [0, 0, 0]
    assert t.due("a", 10) == 4  # the line carries what was swallowed meanwhile
    for key in ("b", "c", "d"):
        t.due(key, 0)
    assert len(t._state) == 2


# ---------------------------------------------------------------- framing


def test_framing_byte_by_byte() -> None:
    msg = b"OPTIONS sip:a@b SIP/2.0\r\nl: 5\r\n\r\nhello"
    f = StreamFramer()
    out = []
    for b in b"\r\n\r\n" + msg + msg:
        out += f.feed(bytes([b]))
    assert out == [msg, msg]
