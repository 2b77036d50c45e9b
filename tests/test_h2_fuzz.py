"""The HTTP/2 codec binding under fuzzing, bounded for `make test` (about 4 s): 10,000 mutated
frame sequences from real captures through real nghttp2 sessions in the proxy's connection
class, both sides (tests/h2_fuzz.py; a longer run is documented there)."""

import asyncio

import h2_fuzz

CASES = 10000
RSS_GROWTH_MAX_KIB = 8 * 1024  # over the second half; a leak of a session per case would be ~100 MiB


def test_mutated_frames_from_real_captures_never_crash_raise_or_leak():
    assert h2_fuzz.load_corpus()["client"] and h2_fuzz.load_corpus()["server"]
    result = asyncio.run(h2_fuzz.fuzz(CASES, seed=1))
    assert result["escaped"] == []
    assert result["callback_errors"] == []
    assert result["sessions_left"] == 0
    assert result["rss_growth_kib"] < RSS_GROWTH_MAX_KIB, result["rss_growth_kib"]
