"""Helpers for media checks: known test audio, and tshark capture of the RTP a peer receives."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
from pathlib import Path

import numpy as np

from tests.conftest import stop_process, wait_until


def make_signal_ulaw(path: Path, seconds: float = 2.0, seed: int = 7) -> bytes:
    """A mu-law file of distinct content (noise shaped into syllables): every 20 ms frame is unique."""
    rng = np.random.default_rng(seed)
    n = int(8000 * seconds)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * np.arange(n) / 8000)
    samples = (rng.normal(0, 4000, n) * envelope).clip(-32000, 32000).astype(np.int16)
    from gateway.media import g711

    data = g711.encode("PCMU", samples)
    path.write_bytes(data)
    return data


class Capture:
    """tshark on loopback with a capture filter; started before the call, stopped by its PID."""

    def __init__(self, pcap: Path, bpf: str) -> None:
        self.pcap = pcap
        self.proc = subprocess.Popen(["tshark", "-i", "lo", "-f", bpf, "-w", str(pcap), "-q"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._err = b""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        os.set_blocking(fd, False)

        def ready() -> bool:
            try:
                self._err += os.read(fd, 65536)
            except BlockingIOError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError("tshark exited: " + self._err.decode(errors="replace"))
            return b"Capturing on" in self._err

        try:
            wait_until(ready, 20, "tshark to start capturing")
        except BaseException:
            self.stop()  # never leave a capture running behind a failed start
            raise

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT)  # SIGINT: tshark flushes the capture file

    def udp_payloads(self) -> list[tuple[float, int, int, bytes]]:
        """(time, src port, dst port, UDP payload) for each captured packet, read from the pcap file."""
        return read_pcap_udp(self.pcap)


def read_pcap_udp(pcap: Path) -> list[tuple[float, int, int, bytes]]:
    """A minimal pcap reader (tshark -w writes pcapng by default: ask tshark to convert)."""
    out = subprocess.run(["tshark", "-r", str(pcap), "-F", "pcap", "-w", "-"], capture_output=True, timeout=60, check=True).stdout
    magic = struct.unpack_from("<I", out)[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
    linktype = struct.unpack_from(endian + "I", out, 20)[0]
    pos = 24
    packets = []
    while pos + 16 <= len(out):
        sec, frac, incl, _ = struct.unpack_from(endian + "IIII", out, pos)
        pos += 16
        frame = out[pos : pos + incl]
        pos += incl
        ts = sec + frac / (1e9 if nano else 1e6)
        if linktype == 1:  # Ethernet (Linux lo)
            ip = frame[14:]
        elif linktype == 113:  # Linux cooked
            ip = frame[16:]
        else:
            ip = frame[4:]  # BSD loopback / null
        if not ip or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        ihl = (ip[0] & 0x0F) * 4
        src, dst = struct.unpack_from("!HH", ip, ihl)
        packets.append((ts, src, dst, bytes(ip[ihl + 8 :])))
    return packets
