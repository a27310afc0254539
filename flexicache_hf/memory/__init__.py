"""The memory room: where every page of K/V lives, the copies between places, and what it holds.

    LayerMemory    one layer: head groups, validity, page metadata; the only interface the layer uses
    GpuPages       unstable heads: every page on the GPU
    OffloadedPages stable heads: GPU slots (block table `slot_page`) + pinned host pool + copy stream
    PageMetadata   what selection reads, per page and head, on the GPU
    alloc          growth policy (capacity_for) and the reserved-bytes count

Engine-neutral: nothing here imports transformers. Compute reaches the pools only through what
LayerMemory hands out: page groups (pools + block tables) for attention, metadata rows for selection.
"""

from flexicache_hf.memory.alloc import capacity_for, reserved_bytes
from flexicache_hf.memory.layer import Chunk, LayerMemory, sync_lengths

__all__ = ["LayerMemory", "Chunk", "capacity_for", "reserved_bytes", "sync_lengths"]
