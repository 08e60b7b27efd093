# Decoder fuzzing (protocols/uplink.py decode, uplink.decode_ack): random and mutated frames must
# decode to well-formed values or raise FrameError, nothing else. Seeded, so a failure repeats.
#
# Half of the mutated frames are re-signed with the right key after mutation, so that they get
# past the tag check and exercise the parser behind it; the rest test the tag check itself.
# 100 000 cases run in the default suite (~10 s); `pytest -m slow` runs 2 000 000.

import json
import random
import time
from pathlib import Path

import pytest

from protocols import frame, uplink

decoders = uplink

VECTORS = Path(__file__).resolve().parent.parent / "protocols" / "vectors"
KEY = bytes(range(16))
SIGNER = frame.Signer(KEY)
U32 = 0xFFFFFFFF
I32_MIN = -(1 << 31)
I32_MAX = (1 << 31) - 1
INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x11, 0x12, 0x13, 0x21, 0x22, 0x23, 0xFE, 0x0F, 0xF0)


def seed_frames(rng):
    """Valid frames under KEY: the vectors (re-signed under KEY) and random encodings."""
    out = []
    for name in (
        "data_single.json",
        "data_batch.json",
        "ack.json",
        "status.json",
        "data_v2.json",
        "ack_v2.json",
        "status_v2.json",
    ):
        for case in json.loads((VECTORS / name).read_text())["cases"]:
            buf = bytes.fromhex(case["frame"])
            out.append(sign(buf[:-4]))
    while len(out) < 200:
        kind = rng.randrange(3)
        version = rng.choice((1, 2))
        echo = rng.getrandbits(32).to_bytes(4, "big") if version == 2 else None
        node_id, seq = rng.choice((rng.randrange(200), rng.getrandbits(32))), rng.getrandbits(20)
        if kind == 0:
            n = rng.randint(1, 30)
            channels = (
                (1, 2, 3)
                if rng.random() < 0.5
                else tuple(
                    rng.choice((1, 4, 6, 77, rng.getrandbits(16)))
                    for _ in range(rng.randint(1, 4))
                )
            )
            values = [rng.randint(-3000, 3000) for _ in channels]
            readings = []
            for _ in range(n):
                values = [v + rng.randint(-20, 20) for v in values]
                readings.append(tuple(values))
            newest = rng.choice((0, rng.randrange(1000)))
            step = rng.choice((10, 60, 45, 300))
            ages = [newest + step * (n - 1 - i) + rng.choice((0, 0, 0, 1)) * i for i in range(n)]
            ages.sort(reverse=True)
            try:
                out.append(
                    frame.encode_data(
                        SIGNER, node_id, seq, channels, readings, ages, version=version
                    )
                )
            except frame.FrameError:
                pass
        elif kind == 1:
            bounds = sorted(set(rng.getrandbits(rng.choice((8, 32))) for _ in range(10)))
            acked = [(bounds[i], bounds[i + 1]) for i in range(0, len(bounds) - 1, 2)]
            out.append(uplink.encode_ack(SIGNER, node_id, rng.getrandbits(32), acked, echo))
        else:
            fields = {rng.randint(1, 12): rng.randint(-100000, 100000) for _ in range(6)}
            out.append(frame.encode_status(SIGNER, node_id, seq, fields, version=version))
    return out


def sign(body):
    return bytes(body) + SIGNER.tag(bytes(body))


def mutate(rng, buf, seeds):
    """One to four mutations of buf: bit flips, inserts, deletes, overwrites, truncation,
    splicing with another frame, duplicated runs."""
    b = bytearray(buf)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 4))):
        op = rng.randrange(8)
        n = len(b)
        if op == 0 and n:
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b.insert(rng.randint(0, n), rng.randrange(256))
        elif op == 2 and n:
            del b[rng.randrange(n)]
        elif op == 3 and n:
            b[rng.randrange(n)] = rng.choice(INTERESTING)
        elif op == 4:
            del b[rng.randint(0, n) :]
        elif op == 5:
            other = rng.choice(seeds)
            b = b[: rng.randint(0, n)] + other[rng.randint(0, len(other)) :]
        elif op == 6 and n:
            i = rng.randrange(n)
            j = rng.randint(i, min(n, i + 8))
            b[j:j] = b[i:j]
        elif n:  # a burst of flipped bits, as radio noise makes them
            i = rng.randrange(n)
            for j in range(i, min(n, i + rng.randint(1, 4))):
                b[j] ^= rng.randrange(256)
    return bytes(b)


def garbage(rng):
    n = rng.choice((rng.randint(0, 12), rng.randint(0, 64), rng.randint(0, 300)))
    b = bytearray(rng.getrandbits(8) for _ in range(n))
    if n and rng.random() < 0.8:
        b[0] = rng.choice((0x11, 0x12, 0x13, 0x21, 0x22, 0x23))
    return bytes(b)


def check_well_formed(d):
    """A decoded frame holds only values the encoders accept."""
    assert 0 <= d.node_id <= U32
    if isinstance(d, uplink.Ack):
        assert 0 <= d.host_time <= U32 and len(d.acked) <= 32
        assert d.echo is None or len(d.echo) == 4
        nxt = 0
        for first, last in d.acked:
            assert nxt <= first <= last <= U32
            nxt = last + 1
        return
    if isinstance(d, decoders.Status):
        assert 0 <= d.seq <= U32 and d.version in (1, 2)
        for fid, v in d.fields.items():
            assert 0 <= fid <= U32 and I32_MIN <= v <= I32_MAX
        return
    assert isinstance(d, decoders.DataFrame)
    n = len(d.readings)
    if d.version == 1:
        assert 0 <= d.seq <= U32 and d.index is None
    else:
        assert d.seq is None and 0 <= d.index and d.index + n - 1 <= U32
    assert 1 <= len(d.channels) <= 32
    assert all(0 <= ch <= U32 for ch in d.channels), "channel id over u32: %r" % (d.channels,)
    assert 1 <= n <= frame.MAX_READINGS and len(d.ages) == n
    for r in d.readings:
        assert len(r) == len(d.channels) and all(I32_MIN <= v <= I32_MAX for v in r)
    assert all(0 <= a <= U32 for a in d.ages), "age over u32: %r" % (d.ages,)
    assert all(d.ages[i - 1] >= d.ages[i] for i in range(1, n))


def reencode(d):
    """Encode a decoded frame again: it must decode to the same values (bytes may differ, as a
    decoder accepts choices that the encoder would not make, e.g. a larger Rice k)."""
    try:
        if isinstance(d, uplink.Ack):
            buf = uplink.encode_ack(SIGNER, d.node_id, d.host_time, d.acked, d.echo)
        elif isinstance(d, decoders.Status):
            buf = frame.encode_status(SIGNER, d.node_id, d.seq, d.fields, version=d.version)
        else:
            first = d.seq if d.version == 1 else d.index
            buf = frame.encode_data(
                SIGNER, d.node_id, first, d.channels, d.readings, d.ages, version=d.version
            )
    except frame.FrameError as e:  # the encoder's own choices may not fit where the frame did
        assert e.reason == "too_long", str(e)
        return
    assert decoders.decode(buf, SIGNER) == d


def fuzz(cases, seed):
    """Run `cases` fuzz cases; return (counts by outcome, failures as hex frame: what)."""
    rng = random.Random(seed)
    seeds = seed_frames(rng)
    counts = {}
    failures = []
    for _ in range(cases):
        r = rng.random()
        if r < 0.1:
            buf, resigned = garbage(rng), False
        else:
            buf = mutate(rng, rng.choice(seeds), seeds)
            resigned = r < 0.55 and len(buf) >= 4
            if resigned:
                buf = sign(buf[:-4])
        try:
            decoded = decoders.decode(buf, SIGNER)
        except frame.FrameError as e:
            outcome = e.reason
        except Exception as e:  # noqa: BLE001 - exactly what this test looks for
            failures.append("%s: %r" % (buf.hex(), e))
            continue
        else:
            outcome = "decoded"
            try:
                check_well_formed(decoded)
                if resigned:
                    reencode(decoded)
            except Exception as e:  # noqa: BLE001
                failures.append("%s: %r -> %r" % (buf.hex(), decoded, e))
        key = ("resigned " if resigned else "") + outcome
        counts[key] = counts.get(key, 0) + 1
    return counts, failures


def check(counts, failures, cases):
    assert not failures, "%d bad outcomes, e.g.\n%s" % (len(failures), "\n".join(failures[:5]))
    resigned = sum(v for k, v in counts.items() if k.startswith("resigned "))
    # Re-signed frames must get past the tag into the parser, and some must decode.
    assert counts.get("resigned tag", 0) == 0
    assert counts.get("resigned decoded", 0) > resigned // 50, counts
    for reason in ("truncated", "structure", "version", "type"):
        assert counts.get("resigned " + reason, 0) > 0, counts
    assert counts.get("tag", 0) > cases // 4, counts


def test_decoder_fuzz_100k():
    t0 = time.perf_counter()
    counts, failures = fuzz(100_000, seed=20240601)
    print("fuzz 100k: %.1f s %s" % (time.perf_counter() - t0, sorted(counts.items())))
    check(counts, failures, 100_000)


@pytest.mark.slow
def test_decoder_fuzz_2m():
    counts, failures = fuzz(2_000_000, seed=7)
    print(sorted(counts.items()))
    check(counts, failures, 2_000_000)
