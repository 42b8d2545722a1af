"""A small JPEG Lossless encoder (ITU-T T.81 process 14, first-order prediction, SV1).

pydicom 3 has no encoder for the JPEG Lossless SV1 transfer syntax
(1.2.840.10008.1.2.4.70), which is what many real CT files (RSNA 2022 among them) use.
This module writes it directly with numpy: predictor 1 (left neighbour; first row left,
first column above, first sample ``2**(P-1)``), differences modulo 2**16, one Huffman
table optimised for the image (T.81 Annex K.2/K.3), byte stuffing. The output decodes
with libjpeg (pylibjpeg-libjpeg), GDCM and dcmtk's ``dcmdjpeg``; the tests check it.
"""

from __future__ import annotations

import heapq

import numpy as np

TRANSFER_SYNTAX_UID = "1.2.840.10008.1.2.4.70"
_N_CAT = 17  # difference categories SSSS = 0..16


def _code_lengths(freq: np.ndarray) -> dict[int, int]:
    """Huffman code length of each used symbol, limited to 16 bits (T.81 Annex K.2, K.3)."""
    symbols = [int(s) for s in np.nonzero(freq)[0]]
    reserved = _N_CAT  # a dummy symbol so that no real code is all ones
    counts = {s: int(freq[s]) for s in symbols}
    counts[reserved] = 1
    if len(counts) == 1:  # pragma: no cover - there is always the reserved symbol
        return {symbols[0]: 1}
    heap: list[tuple[int, int, list[int]]] = [(c, s, [s]) for s, c in counts.items()]
    heapq.heapify(heap)
    size = dict.fromkeys(counts, 0)
    tie = _N_CAT + 1
    while len(heap) > 1:
        c1, _, g1 = heapq.heappop(heap)
        c2, _, g2 = heapq.heappop(heap)
        for s in g1 + g2:
            size[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, g1 + g2))
        tie += 1
    bits = [0] * 64
    for s in counts:
        bits[size[s]] += 1
    i = 63
    while i > 16:
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
        i -= 1
    # Symbols by original code size (reserved last within its size), then sizes from BITS.
    order = sorted(counts, key=lambda s: (size[s], s == reserved, s))
    lengths: dict[int, int] = {}
    pos = 0
    for length in range(1, 17):
        for _ in range(bits[length]):
            lengths[order[pos]] = length
            pos += 1
    lengths.pop(reserved, None)
    return lengths


def _canonical(lengths: dict[int, int]) -> tuple[list[int], list[int], dict[int, int]]:
    """BITS (counts per length 1..16), HUFFVAL and the code of each symbol (Annex C)."""
    huffval = sorted(lengths, key=lambda s: (lengths[s], s))
    bits = [sum(1 for s in huffval if lengths[s] == n) for n in range(1, 17)]
    codes: dict[int, int] = {}
    code = 0
    k = 0
    for n in range(1, 17):
        for _ in range(bits[n - 1]):
            codes[huffval[k]] = code
            code += 1
            k += 1
        code <<= 1
    return bits, huffval, codes


def encode(image: np.ndarray, precision: int) -> bytes:
    """Encode one monochrome frame as a JPEG Lossless SV1 bit stream.

    Parameters
    ----------
    image
        2D integer array. Signed input is stored as its two's-complement bit pattern
        (as DICOM does for PixelRepresentation 1); values must fit in ``precision`` bits.
    precision
        Sample precision P (2..16), normally BitsStored.

    Returns
    -------
    bytes
        SOI ... EOI, without DICOM padding.
    """
    if image.ndim != 2:
        raise ValueError("JPEG Lossless encoding needs a 2D frame")
    if not 2 <= precision <= 16:
        raise ValueError(f"precision must be within 2..16, got {precision}")
    rows, cols = image.shape
    if not (0 < rows < 65536 and 0 < cols < 65536):
        raise ValueError("rows and columns must be within 1..65535")
    mask = (1 << precision) - 1
    a = image.astype(np.int32)
    if image.dtype.kind == "i":
        a &= mask
    elif a.min() < 0 or a.max() > mask:
        raise ValueError(f"unsigned samples must fit in {precision} bits")
    pred = np.empty_like(a)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = a[0, :-1]
    pred[1:, 0] = a[:-1, 0]
    pred[1:, 1:] = a[1:, :-1]
    # differences modulo 2**16 read as signed 16-bit (T.81 H.1.2.1): an int16 cast wraps
    a -= pred
    diff = a.astype(np.int16).astype(np.int32).ravel()
    absd = np.abs(diff)
    ssss = np.frexp(absd.astype(np.float32))[1].astype(np.int64)
    freq = np.bincount(ssss, minlength=_N_CAT)
    bits, huffval, codes = _canonical(_code_lengths(freq))
    code_of = np.zeros(_N_CAT, np.int64)
    len_of = np.zeros(_N_CAT, np.int64)
    for s, c in codes.items():
        code_of[s] = c
    k = 0
    for n in range(1, 17):
        for _ in range(bits[n - 1]):
            len_of[huffval[k]] = n
            k += 1
    extra = np.minimum(ssss, 15)  # category 16 has no extra bits; its low 15 bits are 0
    extra[ssss == 16] = 0
    add = (diff - (diff < 0)).astype(np.int64) & ((np.int64(1) << extra) - 1)
    length = len_of[ssss] + extra
    # Pack the variable-length codes (at most 32 bits each) without a per-bit array:
    # place each code in a 40-bit window aligned to its first byte, cut the window into
    # five bytes and sum them per output byte (codes never share bits, so sum == OR).
    ends = np.cumsum(length)
    total = int(ends[-1])
    starts = ends - length
    window = ((code_of[ssss] << extra) | add) << (40 - (starts & 7) - length)
    first = starts >> 3
    n_bytes = (total + 7) // 8
    packed = np.zeros(n_bytes + 5, np.uint8)
    for k in range(5):
        part = (window >> (32 - 8 * k)) & 0xFF
        packed += np.bincount(first + k, weights=part, minlength=n_bytes + 5).astype(np.uint8)
    packed = packed[:n_bytes]
    pad = (-total) % 8
    if pad:  # fill the last byte with 1-bits (T.81 F.1.2.3)
        packed[-1] |= (1 << pad) - 1
    ff = np.nonzero(packed == 0xFF)[0]
    if ff.size:
        packed = np.insert(packed, ff + 1, 0)
    header = bytearray(b"\xff\xd8")
    header += b"\xff\xc3" + (11).to_bytes(2, "big") + bytes([precision])
    header += rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    dht = bytes([0x00]) + bytes(bits) + bytes(huffval)
    header += b"\xff\xc4" + (2 + len(dht)).to_bytes(2, "big") + dht
    header += b"\xff\xda" + (8).to_bytes(2, "big") + bytes([1, 1, 0x00, 1, 0, 0])
    return bytes(header) + packed.tobytes() + b"\xff\xd9"
