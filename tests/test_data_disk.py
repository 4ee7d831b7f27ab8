"""Local files of any size: read in batches into Arrow on disk, so that preparing one takes memory that does not grow
with the file (`python bench/data_memory.py --gigabytes 2` measures it on ~2 GB files)."""

import pytest

from bench.data_memory import probe, synthetic_file

MIB = 2**20
# what preparing any file holds whatever its size: pyarrow's memory pool, the Arrow writer's batches, the datasets
# machinery; above it, the digests of the kept rows (16 bytes each, in a set) and their indices
FIXED_ALLOWANCE = 96 * MIB


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """~16 MB of distinct MedMCQA rows (~40k)."""
    path = tmp_path_factory.mktemp("disk") / "medmcqa.jsonl"
    return synthetic_file("medical", "medmcqa.jsonl", False, 16 * MIB, path)


def test_preparing_a_local_file_takes_memory_that_does_not_grow_with_it(big_file):
    measured = probe(big_file, "medical")

    text = big_file.read_text(encoding="utf-8")
    unlabelled = text.count('"cop": -1')  # the converter drops them; every other row is distinct and kept
    assert (measured["rows"], measured["kept"]) == (text.count("\n"), text.count("\n") - unlabelled)
    growth = measured["peak_rss"] - measured["baseline_rss"]
    # reading the whole file into Python rows (as it was) takes ~12x the file; a batch at a time, about nothing
    assert growth < FIXED_ALLOWANCE + measured["file_bytes"] // 2, (
        f"peak resident set grew {growth / MIB:.0f} MiB for a {measured['file_bytes'] / MIB:.0f} MiB file")
    # the resident set also counts the pages of the memory-mapped Arrow files read so far (page cache, which the
    # kernel takes back under pressure); the process's own memory stays flat
    assert measured["peak_anon_rss"] - measured["baseline_anon_rss"] < FIXED_ALLOWANCE
