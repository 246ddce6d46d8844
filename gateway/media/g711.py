"""G.711 mu-law and A-law (ITU-T G.711) with numpy lookup tables."""

from __future__ import annotations

import numpy as np


def _ulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


def _alaw_decode_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    sign = a & 0x80
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(sign != 0, magnitude, -magnitude).astype(np.int16)


ULAW_DECODE = _ulaw_decode_table()
ALAW_DECODE = _alaw_decode_table()


def _encode_table(decode: np.ndarray) -> np.ndarray:
    """For every int16 value, the code whose decoded value is nearest (65536-entry table)."""
    order = np.argsort(decode, kind="stable")
    values = decode[order].astype(np.int32)
    samples = np.arange(-32768, 32768, dtype=np.int32)
    idx = np.clip(np.searchsorted(values, samples), 1, len(values) - 1)
    lower, upper = values[idx - 1], values[idx]
    pick = np.where(samples - lower <= upper - samples, idx - 1, idx)
    return order[pick].astype(np.uint8)


ULAW_ENCODE = _encode_table(ULAW_DECODE)
ALAW_ENCODE = _encode_table(ALAW_DECODE)

SILENCE = {"PCMU": 0xFF, "PCMA": 0xD5}


def decode(codec: str, payload: bytes) -> np.ndarray:
    table = ULAW_DECODE if codec == "PCMU" else ALAW_DECODE
    return table[np.frombuffer(payload, dtype=np.uint8)]


def encode(codec: str, samples: np.ndarray) -> bytes:
    table = ULAW_ENCODE if codec == "PCMU" else ALAW_ENCODE
    return table[samples.astype(np.int16).view(np.uint16) ^ 0x8000].tobytes()
