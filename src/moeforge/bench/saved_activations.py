"""The bytes autograd holds saved for backward, counted with `saved_tensors_hooks`: the activation
memory of a step without the parameters and buffers (`moeforge bench pp` compares its peak with
the planner's activations in flight)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class _Saved:
    """A tensor autograd saved for backward; tells the meter when autograd lets it go."""

    def __init__(self, tensor: torch.Tensor, meter: SavedActivationMeter, key: int):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        self.meter.release(self.key)


class SavedActivationMeter:
    """Bytes of the storages autograd holds saved for backward: alive now, at the peak, and packed
    in all. A storage saved by several ops counts once; the `skipped` tensors' storages (parameters,
    buffers) never count. Use `hooks()` as a context manager around the forwards."""

    def __init__(self, skipped: Iterable[torch.Tensor]):
        self.skipped = {t.untyped_storage().data_ptr() for t in skipped}
        self.references: dict[int, list[int]] = {}  # storage address -> [bytes, saved references]
        self.live_bytes = self.peak_bytes = self.packed_bytes = 0

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor) -> _Saved | torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.skipped or storage.nbytes() == 0:
            return tensor
        if key not in self.references:
            self.references[key] = [storage.nbytes(), 0]
            self.live_bytes += storage.nbytes()
            self.packed_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.references[key][1] += 1
        return _Saved(tensor, self, key)

    @staticmethod
    def unpack(saved: _Saved | torch.Tensor) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def release(self, key: int) -> None:
        entry = self.references[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self.references[key]
