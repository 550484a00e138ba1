"""Cache format: storage codes, stride, headers, quantisation round trips within each format's bound,
key / text hashing."""

import hashlib
import struct

import numpy as np
import pytest
import torch

from llm2clip.cache import format as fmt
from llm2clip.cache.gather import gather_rows_torch
from llm2clip.cache.index import (
    HashSet128,
    first_unseen,
    key_hashes,
    normalize_caption,
    shard_name,
    sorted_lookup,
    text_hashes,
)

STORAGE_NAMES = [s.name for s in fmt.STORAGES]
DIMS = [1, 59, 97, 1025]


def test_storage_codes_are_fixed():
    # Shared with the C++ extension: never renumber.
    assert [(s.code, s.name, s.dtype) for s in fmt.STORAGES] == [
        (0, "fp32", torch.float32),
        (1, "bf16", torch.bfloat16),
        (2, "fp16", torch.float16),
        (3, "int8", torch.int8),
        (4, "fp8_e4m3", torch.float8_e4m3fn),
    ]
    assert fmt.storage_of("bfloat16").code == 1 and fmt.storage_of(4).name == "fp8_e4m3"
    with pytest.raises(ValueError):
        fmt.storage_of("int4")
    with pytest.raises(ValueError):
        fmt.storage_of(5)


@pytest.mark.parametrize("storage", STORAGE_NAMES)
@pytest.mark.parametrize("dim", [1, 59, 64, 97, 1025, 4096])
def test_row_stride_is_padded_to_128(storage, dim):
    st = fmt.storage_of(storage)
    stride = fmt.row_stride(dim, st)
    assert stride % 128 == 0
    assert 0 <= stride - dim * st.itemsize < 128


def test_header_layout():
    st = fmt.storage_of("int8")
    raw = fmt.rows_header(st, 59, 1234).pack()
    assert len(raw) == fmt.HEADER_BYTES == 4096
    assert raw[:8] == b"L2CROWS\0"
    assert struct.unpack_from("<IIQQQ", raw, 8) == (fmt.FILE_VERSION, 3, 59, 128, 1234)
    assert not any(raw[40:])
    assert fmt.Header.unpack(raw) == fmt.rows_header(st, 59, 1234)
    with pytest.raises(fmt.CorruptCacheError, match="padding"):
        fmt.Header.unpack(raw[:100] + b"\1" + raw[101:])
    with pytest.raises(fmt.CorruptCacheError, match="truncated"):
        fmt.Header.unpack(raw[:4000])


def _embeddings(n, dim, seed=0):
    """Rows with very different magnitudes and, within a row, a wide dynamic range (subnormals
    of fp8 relative to the row scale), plus an all-zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    x *= 10.0 ** torch.empty(n, dim, dtype=torch.float64).uniform_(-4, 0, generator=g)
    x *= 10.0 ** torch.linspace(-3, 2, n, dtype=torch.float64).unsqueeze(1)
    x = x.float()
    x[n // 2] = 0
    return x


def _bound(storage, x, scale):
    """Largest |dequant(quant(x)) - x| the format allows, per element (x fp32, scale (n, 1)).

    fp32: exact.
    bf16 / fp16: round to nearest = half an ulp. In the binade [2^e, 2^(e+1)) a p-bit significand
      (bf16 p = 8, fp16 p = 11) has ulp 2^(e-p+1), so half an ulp <= 2^-p |x|; fp16 subnormals
      (|x| < 2^-14) have spacing 2^-24, half of it 2^-25.
    int8: y = x / scale, q = round(y): |q - y| <= 1/2, so |q * scale - x| <= scale / 2.
    fp8 e4m3 (3 mantissa bits, p = 4): for normal y half an ulp <= 2^-4 |y|; subnormals (|y| < 2^-6)
      have spacing 2^-9, half 2^-10. So |dq - x| <= 2^-4 |x| + 2^-10 scale. (The issue's
      2^-3 |x| + 2^-9 scale is the full spacing; rounding to nearest gives half of it.)
    int8 / fp8 also carry three fp32 roundings (x / scale, q * scale, the fp32 scale itself),
      each <= 2^-24 relative: covered by 2^-21 (|x| + scale).
    """
    ax = x.abs()
    if storage == "fp32":
        return torch.zeros_like(x)
    if storage == "bf16":
        return 2.0**-8 * ax
    if storage == "fp16":
        return 2.0**-11 * ax + 2.0**-25
    fp32_slack = 2.0**-21 * (ax + scale)
    if storage == "int8":
        return scale / 2 + fp32_slack
    return 2.0**-4 * ax + 2.0**-10 * scale + fp32_slack


@pytest.mark.parametrize("storage", STORAGE_NAMES)
@pytest.mark.parametrize("dim", DIMS)
def test_roundtrip_within_format_bound(storage, dim):
    st = fmt.storage_of(storage)
    n = 9
    x = _embeddings(n, dim, seed=dim)
    payload, scales = fmt.encode_rows(x, st)
    stride = fmt.row_stride(dim, st)
    assert payload.shape == (n, stride) and payload.dtype == np.uint8
    assert not payload[:, dim * st.itemsize :].any(), "row padding must be zero"
    assert (scales is not None) == st.quantized
    table = torch.from_numpy(payload)
    sc = torch.from_numpy(scales) if scales is not None else None
    out = gather_rows_torch(table, sc, torch.arange(n), dim, st.code, torch.float32)
    err = (out.double() - x.double()).abs()
    scale = sc.double().unsqueeze(1) if sc is not None else torch.zeros(n, 1, dtype=torch.float64)
    bound = _bound(storage, x.double(), scale)
    ratio = float((err / bound.clamp_min(1e-300)).max()) if storage != "fp32" else 0.0
    print(f"{storage} dim={dim}: max err {float(err.max()):.3e}, max err/bound {ratio:.3f}")
    assert bool((err <= bound).all())
    if storage == "fp32":
        assert torch.equal(out, x)
    elif not st.quantized:
        assert torch.equal(out, x.to(st.dtype).float())  # exactly torch's round-to-nearest cast
    else:
        absmax = x.abs().amax(1)
        assert torch.equal(sc, absmax / st.qmax)
        assert not out[n // 2].any() and float(sc[n // 2]) == 0.0  # zero row: scale 0, zeros back


def test_encode_rejects_bad_values():
    with pytest.raises(ValueError, match="non-finite"):
        fmt.encode_rows(torch.tensor([[1.0, float("nan")]]), "bf16")
    with pytest.raises(ValueError, match="overflow"):
        fmt.encode_rows(torch.tensor([[1e6, 1.0]]), "fp16")
    with pytest.raises(ValueError, match=r"\(n, dim\)"):
        fmt.encode_rows(torch.ones(3), "fp32")


def test_normalize_caption_and_text_hash():
    assert normalize_caption("  A\u00a0Dog\t on\n\nthe ＳＯＦＡ ") == "a dog on the sofa"
    h = text_hashes(["A dog on the sofa", "  a   DOG on the sofa\n", "a cat"])
    assert h.dtype == np.dtype("S16") and len(h) == 3
    assert h[0] == h[1] and h[0] != h[2]
    assert h.tobytes()[:16] == hashlib.blake2b(b"a dog on the sofa", digest_size=16).digest()


def test_key_hash_definition():
    # Pinned definition (caches on disk depend on it): blake2b-64 of "shard\x1fkey\x1ffield", LE.
    got = key_hashes("00042.tar", ["k1", "k2"], ["short", "dense"])
    want = [
        int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
        for s in ("00042.tar\x1fk1\x1fshort", "00042.tar\x1fk2\x1fdense")
    ]
    assert got.dtype == np.uint64 and got.tolist() == want
    assert key_hashes(["a", "b"], ["k", "k"], "f")[0] != key_hashes(["a", "b"], ["k", "k"], "f")[1]
    assert shard_name("s3://bucket/cc3m/00042.tar") == shard_name("/data/cc3m/00042.tar") == "00042.tar"


def test_sorted_lookup_and_hashset():
    keys = np.array([3, 7, 9, 20], dtype=np.uint64)
    vals = np.array([30, 70, 90, 200], dtype=np.int64)
    q = np.array([7, 8, 0, 20, 21], dtype=np.uint64)
    assert sorted_lookup(keys, vals, q).tolist() == [70, -1, -1, 200, -1]
    assert sorted_lookup(keys[:0], vals[:0], q).tolist() == [-1] * 5

    hs = HashSet128()
    hashes = text_hashes([f"caption {i}" for i in range(100)])
    for lo in range(0, 100, 7):  # many small runs get merged
        hs.add(hashes[lo : lo + 7])
    assert len(hs) == 100 and len(hs._runs) <= 8
    assert hs.contains(hashes).all()
    other = text_hashes(["x", "caption 5", "x"])
    assert hs.contains(other).tolist() == [False, True, False]
    assert first_unseen(other, hs).tolist() == [True, False, False]
