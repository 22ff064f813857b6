"""A fragmentation-free pool of fixed-size KV pages (paged attention style).

Pages are interchangeable, so the pool only counts them: a sequence holding
``n`` tokens holds ``ceil(n / page_tokens)`` pages and there is no external
fragmentation; the only waste is the unused tail of each sequence's last page
(reported as ``internal_waste_tokens``).
"""

from __future__ import annotations

from wicore.errors import ConfigError


class PagePool:
    def __init__(self, num_pages: int, page_tokens: int, page_bytes: int, name: str = "kv") -> None:
        if page_tokens <= 0:
            raise ConfigError(f"memory.page_tokens: must be > 0, got {page_tokens}")
        if num_pages < 0:
            raise ConfigError(f"{name}: negative page count {num_pages}")
        self.num_pages = num_pages
        self.page_tokens = page_tokens
        self.page_bytes = page_bytes
        self.name = name
        self.used_pages = 0
        self.peak_pages = 0

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_tokens)

    @property
    def free_pages(self) -> int:
        return self.num_pages - self.used_pages

    @property
    def used_bytes(self) -> int:
        return self.used_pages * self.page_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    def can_allocate(self, pages: int) -> bool:
        return pages <= self.free_pages

    def allocate(self, pages: int) -> bool:
        """Take ``pages`` pages; False (and nothing taken) if they are not free."""
        if pages > self.free_pages:
            return False
        self.used_pages += pages
        if self.used_pages > self.peak_pages:
            self.peak_pages = self.used_pages
        return True

    def release(self, pages: int) -> None:
        if pages > self.used_pages:
            raise RuntimeError(f"{self.name}: releasing {pages} pages but only {self.used_pages} are used")
        self.used_pages -= pages
