"""SIP dialogs (RFC 3261 section 12): identity, CSeq bookkeeping, route set, building in-dialog requests."""

from __future__ import annotations

from dataclasses import dataclass, field

from .message import Headers, NameAddr, Request, Response, SipUri
from .transaction import Target


@dataclass
class Dialog:
    call_id: str
    local_tag: str
    remote_tag: str
    local_uri: str  # the From (ours) / To (theirs) header values without tags
    remote_uri: str
    remote_target: str
    route_set: list[str] = field(default_factory=list)
    local_cseq: int = 1
    remote_cseq: int | None = None
    transport: str = "udp"
    contact: str = ""  # our Contact header value

    @property
    def id(self) -> tuple[str, str, str]:
        return (self.call_id, self.local_tag, self.remote_tag)

    @classmethod
    def as_uas(cls, invite: Request, local_tag: str, contact: str, transport: str) -> Dialog:
        """The dialog a 2xx to `invite` creates on our (UAS) side (RFC 3261 section 12.1.1)."""
        from_ = invite.from_
        to = invite.to
        contacts = invite.headers.get_all("contact")
        target = str(NameAddr.parse(contacts[0]).uri) if contacts else str(from_.uri)
        return cls(
            call_id=invite.call_id,
            local_tag=local_tag,
            remote_tag=from_.tag or "",
            local_uri=_strip_tag(to),
            remote_uri=_strip_tag(from_),
            remote_target=target,
            route_set=list(invite.headers.get_all("record-route")),
            local_cseq=0,
            remote_cseq=invite.cseq[0],
            transport=transport,
            contact=contact,
        )

    @classmethod
    def as_uac(cls, invite: Request, response: Response, transport: str) -> Dialog:
        """The dialog a 2xx (or 1xx with a tag) to our `invite` creates (RFC 3261 section 12.1.2)."""
        contacts = response.headers.get_all("contact")
        target = str(NameAddr.parse(contacts[0]).uri) if contacts else invite.uri
        return cls(
            call_id=invite.call_id,
            local_tag=invite.from_.tag or "",
            remote_tag=response.to.tag or "",
            local_uri=_strip_tag(invite.from_),
            remote_uri=_strip_tag(invite.to),
            remote_target=target,
            route_set=list(reversed(response.headers.get_all("record-route"))),
            local_cseq=invite.cseq[0],
            transport=transport,
            contact=invite.headers.get("contact") or "",
        )

    def accept_remote_cseq(self, number: int) -> bool:
        """False when an in-dialog request is out of order (answer 500, RFC 3261 12.2.2)."""
        if self.remote_cseq is not None and number <= self.remote_cseq:
            return False
        self.remote_cseq = number
        return True

    def create_request(self, method: str, body: bytes = b"", content_type: str | None = None) -> Request:
        if method not in ("ACK", "CANCEL"):
            self.local_cseq += 1
        h = Headers()
        for route in self.route_set:
            h.add("Route", route)
        h.add("Max-Forwards", "70")
        h.add("From", f"{self.local_uri};tag={self.local_tag}")
        h.add("To", f"{self.remote_uri};tag={self.remote_tag}")
        h.add("Call-ID", self.call_id)
        h.add("CSeq", f"{self.local_cseq} {method}")
        if self.contact and method in ("INVITE", "UPDATE"):
            h.add("Contact", self.contact)
        if content_type and body:
            h.add("Content-Type", content_type)
        return Request(method, self.remote_target, h, body)

    def create_ack(self, cseq: int, body: bytes = b"") -> Request:
        req = self.create_request("ACK", body, "application/sdp" if body else None)
        req.headers.set("CSeq", f"{cseq} ACK")
        return req

    def destination(self, conn: int | None = None) -> Target:
        """Next hop for in-dialog requests: the first loose route, else the remote target."""
        uri = SipUri.parse(self.remote_target)
        if self.route_set:
            first = NameAddr.parse(self.route_set[0]).uri
            if "lr" in first.params:
                uri = first
        transport = (uri.params.get("transport") or self.transport).lower()
        return Target(transport, uri.host, uri.port or (5061 if transport == "tls" else 5060), conn)


def _strip_tag(addr: NameAddr) -> str:
    params = {k: v for k, v in addr.params.items() if k != "tag"}
    return str(NameAddr(addr.uri, addr.display, params))
