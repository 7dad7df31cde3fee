"""Source wrappers that present alternative checkpoint layouts as the HF one."""
from __future__ import annotations

import numpy as np

_Q, _V, _FUSED = ".q_bias", ".v_bias", ".qkv.bias"


class FuseQVBias:
    """Presents each `<p>.q_bias` + `<p>.v_bias` pair as one `<p>.qkv.bias` = [q, 0, v].

    EVA/LAVIS attention (and early HF BLIP-2 files) store the query and value
    biases separately; the key bias is zero by construction. Other keys pass
    through unchanged; a lone q_bias or v_bias is left as is (and then shows up
    as unexpected in the conversion report). Same interface as DictSource.
    """

    def __init__(self, source):
        self.source = source
        keys = list(source.keys())
        present = set(keys)
        self._fused: dict[str, str] = {}  # fused key -> prefix
        for k in keys:
            if k.endswith(_Q):
                prefix = k[: -len(_Q)]
                if prefix + _V in present and prefix + _FUSED not in present:
                    self._fused[prefix + _FUSED] = prefix
        hidden = {p + s for p in self._fused.values() for s in (_Q, _V)}
        self._keys = []
        for k in keys:
            if k in hidden:
                if k.endswith(_Q):  # fused key takes the place of the pair
                    self._keys.append(k[: -len(_Q)] + _FUSED)
            else:
                self._keys.append(k)

    def keys(self):
        return list(self._keys)

    def shape(self, key):
        if key in self._fused:
            q, v = (self.source.shape(self._fused[key] + s) for s in (_Q, _V))
            if q != v or len(q) != 1:
                raise ValueError(f"cannot fuse {self._fused[key]}{_Q} {q} and {_V} {v}: expected equal 1-D shapes")
            return (3 * q[0],)
        return self.source.shape(key)

    def dtype(self, key):
        if key in self._fused:
            return self.source.dtype(self._fused[key] + _Q)
        return self.source.dtype(key)

    def close(self):
        if hasattr(self.source, "close"):
            self.source.close()

    def read_rows(self, key, start, stop):
        if key in self._fused:
            return self.read(key)[start:stop]
        return self.source.read_rows(key, start, stop)

    def read(self, key):
        if key not in self._fused:
            return self.source.read(key)
        prefix = self._fused[key]
        q = np.asarray(self.source.read(prefix + _Q))
        v = np.asarray(self.source.read(prefix + _V)).astype(q.dtype)
        return np.concatenate([q, np.zeros_like(q), v])
