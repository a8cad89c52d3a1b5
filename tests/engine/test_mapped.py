"""Dropping a checkpoint's mapped pages: clean pages go (and read back the same), a mapping
with a written page is left alone."""

import mmap
import sys

import pytest

from workers.mapped import clean_mappings, drop_mapped_pages, pages_released_while_loading

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux madvise")


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("RssFile:"))


def test_clean_pages_are_dropped_and_read_back_identical(tmp_path):
    path = tmp_path / "w.safetensors"
    data = bytes(range(256)) * (64 * 2**20 // 256)
    path.write_bytes(data)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with pages_released_while_loading():
            assert sum(m[i + 1] for i in range(0, len(m), 4096)) > 0  # every page touched
        before = _rss_file_kb()
        assert clean_mappings(".safetensors")
        touched = sum(m[i + 1] for i in range(0, len(m), 4096))
        assert _rss_file_kb() - before > 32 * 1024  # read back in: they had been dropped
        assert drop_mapped_pages() >= 1
        assert _rss_file_kb() < before + 16 * 1024
        assert m[: 2**20] == data[: 2**20] and touched == sum(data[1::4096])
        m[0] = 7  # a written page: the mapping is no longer clean and is never advised
        assert clean_mappings(".safetensors") == []
        drop_mapped_pages()
        assert m[0] == 7
        m.close()
