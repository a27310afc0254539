"""How the memory room allocates: growth by a little more than needed, and an honest count of what it holds."""

from __future__ import annotations

import torch


def capacity_for(pages: int, headroom: int) -> int:
    """Pages to reserve when `pages` must fit: an eighth more (at least `headroom`), so that growing stays
    amortised O(1) per token while what is reserved stays close to what is used."""
    return pages + max(pages // 8, headroom)


def grow(t: torch.Tensor, dim: int, new_size: int, pin: bool = False) -> torch.Tensor:
    """A copy of `t` with dimension `dim` enlarged to `new_size` (new entries uninitialised: every reader
    masks what was never written). A failed allocation loses nothing: the caller still holds `t`."""
    shape = list(t.shape)
    shape[dim] = new_size
    out = allocate(shape, t.dtype, t.device, pin=pin)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def allocate(shape, dtype, device, pin: bool = False, fill=None) -> torch.Tensor:
    """torch.empty (or full, with `fill`), with an error that says what to change when memory runs out."""
    try:
        out = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
    except RuntimeError as e:
        where = "pinned host" if pin else str(device)
        size = torch.empty((), dtype=dtype).element_size() * torch.Size(shape).numel()
        raise MemoryError(
            f"FlexiCache could not allocate {list(shape)} on {where} memory ({size / 2**30:.2f} GiB): {e}. "
            "Nothing was lost; reduce the batch size or the context length (max_cache_len), or free memory."
        ) from e
    return out if fill is None else out.fill_(fill)


class _Mapped:
    """A pinned host tensor described as CUDA memory (__cuda_array_interface__): pinned memory is mapped
    into the device's address space at the same address (unified addressing)."""

    def __init__(self, t: torch.Tensor):
        self.t = t  # the view keeps the pinned tensor alive
        self.__cuda_array_interface__ = {"shape": (t.numel() * t.element_size() // 2,), "typestr": "<i2",
                                         "data": (t.data_ptr(), False), "version": 3, "strides": None}


def mapped(t: torch.Tensor, device) -> torch.Tensor:
    """A CUDA tensor over the same memory as the pinned host tensor `t` (same shape and dtype): kernels, CUDA
    graphs and torch.compile treat it as device memory and read or write the host pool in place."""
    assert t.is_pinned() and t.is_contiguous() and t.element_size() % 2 == 0
    with torch.cuda.device(device):
        flat = torch.as_tensor(_Mapped(t), device=device)
    return flat.view(t.dtype).view(t.shape)


def reserved_bytes(*owners) -> tuple[int, int]:
    """(device, host) bytes of every tensor storage the owners hold, the memory room's objects inside them
    included, each storage counted once: what is held allocated, whatever part of it is in use. Tensors
    named host_* are the host pool; every other tensor lives on the layer's device."""
    seen: set = set()
    device = host = 0

    def walk(obj):
        nonlocal device, host
        for name, value in vars(obj).items():
            if type(value).__module__.startswith(__package__):
                walk(value)
            elif isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                if name.startswith("host_"):
                    host += value.untyped_storage().nbytes()
                else:
                    device += value.untyped_storage().nbytes()

    for owner in owners:
        walk(owner)
    return device, host
