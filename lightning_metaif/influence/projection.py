"""Seeded random projections of flat gradients, generated block by block (docs/maths.md §5; TracIn, TRAK).

``RandomProjection(p, d)`` maps rows ``x [n, p]`` to ``x Pᵀ [n, d]`` with ``P ∈ R^{d×p}`` of i.i.d. entries
``N(0, 1)/√d`` (``kind="gaussian"``) or ``±1/√d`` (``kind="rademacher"``), or a sparse Johnson-Lindenstrauss
transform (``kind="sjlt"``, Kane & Nelson 2014, block construction): the ``d`` outputs are cut into ``s``
blocks (``nonzeros``) and every input coordinate has exactly one entry ``±1/√s`` in each block, at a random row.
In every case ``E[(Pa)ᵀ(Pb)] = aᵀb`` and ``‖Pa‖²/‖a‖²`` concentrates around 1 with relative spread
``≈ √(2/d)`` (Johnson-Lindenstrauss; the SJLT's variance is at most the Gaussian one). The SJLT is applied
with ``s`` scatter-adds per coordinate, ``O(n·p·s)`` work instead of the dense ``O(n·p·d)``, and its whole
description is ``p·s`` row indices and signs: it is never a dense matrix.

Determinism: ``Pᵀ`` is cut into *generation chunks* of ``G = max(1, 2²⁰ // d)`` rows (about a million entries);
chunk ``c`` is drawn from a CPU ``torch.Generator`` seeded with a SplitMix64 hash of ``(seed, c)``. Gaussian
entries come from the Box-Muller transform of ``torch.rand`` doubles (the Mersenne-Twister stream is
platform-independent; ``log``/``cos`` are evaluated in float64 and rounded to float32, so vectorised maths
libraries cannot change a bit in practice), Rademacher signs from ``torch.randint``. ``P`` therefore depends only
on ``(seed, in_dim, out_dim, kind)``: not on ``block_size``, ``dtype``, the device, or how ``x`` is batched.

Memory: a call holds at most ``max(block_size, G) x d`` entries of ``P`` at once, i.e. at most
``max(block_size · d, 2²⁰)`` (plus the ``[n, d]`` output),
never the whole ``p x d`` matrix, unless the whole matrix is small (``in_dim · out_dim ≤ cache_elements``), in
which case it is generated once and kept to save regeneration across calls.

``in_dim ≤ out_dim`` is allowed and still projects (no identity shortcut), so scores stay comparable across
models; it simply does not compress.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor

Kind = Literal["gaussian", "rademacher", "sjlt"]
KINDS = ("gaussian", "rademacher", "sjlt")
_MASK64 = (1 << 64) - 1
_CHUNK_ELEMENTS = 1 << 20
_STATE_VERSION = 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def chunk_seed(seed: int, chunk: int) -> int:
    """The generator seed of generation chunk ``chunk`` (a 63-bit SplitMix64 hash of ``(seed, chunk)``)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ chunk) >> 1


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return value


class RandomProjection:
    """``x ↦ x Pᵀ`` with a seeded ``d x p`` Gaussian or Rademacher matrix scaled by ``1/√d``, made in blocks.

    Args:
        in_dim: ``p``, the length of the vectors to project (e.g. the number of meta-parameters).
        out_dim: ``d``, the projected dimension.
        seed: any non-negative int; same ``(seed, in_dim, out_dim, kind)``, same projection everywhere.
        kind: ``"gaussian"`` (entries ``N(0,1)/√d``), ``"rademacher"`` (entries ``±1/√d``) or ``"sjlt"``
            (``nonzeros`` entries ``±1/√s`` per input coordinate, one in each block of output rows).
        nonzeros: ``s``, the SJLT's entries per input coordinate (clamped to ``out_dim``; other kinds ignore it).
        block_size: rows of ``Pᵀ`` (coordinates of ``x``) multiplied at once; bounds the memory of a call.
        dtype: floating dtype of the computation and of the output.
        cache_elements: keep the whole matrix after the first call when ``in_dim · out_dim`` is at most this
            (default 2²⁵ entries = 128 MB in float32; 0 disables caching). Without the cache every call
            regenerates ``P`` (cost ∝ ``p·d``): project many rows per call.

    Example:
        >>> import torch
        >>> projection = RandomProjection(1000, 16, seed=3)
        >>> x = torch.randn(4, 1000)
        >>> projection(x).shape
        torch.Size([4, 16])
        >>> torch.allclose(projection(x), x @ RandomProjection(1000, 16, seed=3, cache_elements=0).matrix().T)
        True
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        seed: int = 0,
        kind: Kind = "gaussian",
        block_size: int = 65536,
        dtype: torch.dtype = torch.float32,
        cache_elements: int = 1 << 25,
        nonzeros: int = 4,
    ) -> None:
        self.in_dim = _check_int("in_dim", in_dim, 1)
        self.out_dim = _check_int("out_dim", out_dim, 1)
        self.seed = _check_int("seed", seed, 0)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
        self.kind = kind
        self.block_size = _check_int("block_size", block_size, 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}.")
        self.dtype = dtype
        self.cache_elements = _check_int("cache_elements", cache_elements, 0)
        self.nonzeros = min(_check_int("nonzeros", nonzeros, 1), self.out_dim)
        self._sparse: tuple[Tensor, Tensor] | None = None
        self._csr: Tensor | None = None
        self._no_csr: set[torch.device] = (
            set()
        )  # devices (in this dtype) without a CSR product: not tried again
        self.chunk_rows = max(1, _CHUNK_ELEMENTS // self.out_dim)
        self.num_chunks = math.ceil(self.in_dim / self.chunk_rows)
        self.peak_block_elements = 0  # the most entries of P held at once by a call (diagnostics)
        self._cache: Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"RandomProjection(in_dim={self.in_dim}, out_dim={self.out_dim}, seed={self.seed}, "
            f"kind={self.kind!r}, block_size={self.block_size}, dtype={self.dtype}"
            + (f", nonzeros={self.nonzeros})" if self.kind == "sjlt" else ")")
        )

    # --- generation -------------------------------------------------------------------------------------

    def chunk(self, index: int) -> Tensor:
        """Rows ``[index·G, (index+1)·G)`` of ``Pᵀ`` (already scaled by ``1/√d``), float32 on the CPU."""
        if not 0 <= index < self.num_chunks:
            raise IndexError(f"chunk index {index} out of range [0, {self.num_chunks}).")
        rows = min(self.chunk_rows, self.in_dim - index * self.chunk_rows)
        out = torch.empty(rows, self.out_dim, dtype=torch.float32)
        self._fill(index, out)
        return out

    def _fill(self, index: int, out: Tensor) -> None:
        """Write generation chunk ``index`` into the contiguous float32 ``out`` (``[rows, d]``)."""
        generator = torch.Generator().manual_seed(chunk_seed(self.seed, index))
        flat = out.view(-1)
        count = flat.numel()
        inv_sqrt_d = 1.0 / math.sqrt(self.out_dim)
        if self.kind == "sjlt":
            rows, values = self.sparse_chunk(index)
            out.zero_().scatter_(1, rows, values)
            return
        if self.kind == "gaussian":
            # Box-Muller on float64 uniforms, both outputs used: z₁ = r cos θ fills the first half, z₂ = r sin θ
            # the second.
            half = (count + 1) // 2
            uniform = torch.rand(2, half, generator=generator, dtype=torch.float64)
            radius = torch.log1p(-uniform[0]).mul_(-2.0).sqrt_().mul_(inv_sqrt_d)  # 1 − u ∈ (0, 1]
            angle = uniform[1].mul_(2.0 * math.pi)
            flat[:half].copy_(radius * torch.cos(angle))
            flat[half:].copy_((radius * torch.sin(angle))[: count - half])
        else:
            flat.copy_(torch.randint(0, 2, (count,), generator=generator, dtype=torch.int8))
            flat.mul_(2.0).sub_(1.0).mul_(inv_sqrt_d)

    def sparse_chunk(self, index: int) -> tuple[Tensor, Tensor]:
        """The SJLT's generation chunk ``index``: output rows ``[G, s]`` (int64) and entries ``[G, s]`` (float32)
        of its ``G`` input coordinates; block ``b`` holds rows ``[b·d/s, (b+1)·d/s)``."""
        if self.kind != "sjlt":
            raise ValueError(f"sparse_chunk is only defined for kind='sjlt', not {self.kind!r}.")
        if not 0 <= index < self.num_chunks:
            raise IndexError(f"chunk index {index} out of range [0, {self.num_chunks}).")
        count = min(self.chunk_rows, self.in_dim - index * self.chunk_rows)
        generator = torch.Generator().manual_seed(chunk_seed(self.seed, index))
        s, d = self.nonzeros, self.out_dim
        rows = torch.empty(count, s, dtype=torch.long)
        for block in range(s):
            low, high = block * d // s, (block + 1) * d // s
            rows[:, block] = torch.randint(low, high, (count,), generator=generator)
        signs = torch.randint(0, 2, (count, s), generator=generator, dtype=torch.int8)
        values = signs.to(torch.float32).mul_(2.0).sub_(1.0).mul_(1.0 / math.sqrt(s))
        return rows, values

    def _sparse_all(self) -> tuple[Tensor, Tensor]:
        """``[p, s]`` rows and entries of the whole SJLT (``p·s`` numbers; kept after the first call)."""
        if self._sparse is None:
            parts = [self.sparse_chunk(c) for c in range(self.num_chunks)]
            self._sparse = torch.cat([r for r, _ in parts]), torch.cat([v for _, v in parts])
        return self._sparse

    def _sparse_matrix(self, device: torch.device) -> Tensor | None:
        """The SJLT as a CSR ``P [d, p]`` on ``device`` in :attr:`dtype` (kept; ``None`` where the device has no
        CSR product). Each output row's entries are in coordinate order, as the scatter-adds add them."""
        if self._csr is not None and self._csr.device == device:
            return self._csr
        if device in self._no_csr:
            return None
        indices, values = self._sparse_all()
        columns = torch.arange(self.in_dim).repeat_interleave(self.nonzeros)
        try:
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore")
                matrix = torch.sparse_coo_tensor(
                    torch.stack([indices.reshape(-1), columns]),
                    values.reshape(-1).to(self.dtype),
                    (self.out_dim, self.in_dim),
                )
                self._csr = matrix.coalesce().to_sparse_csr().to(device)
                self._csr @ torch.zeros(self.in_dim, 1, dtype=self.dtype, device=device)  # supported here?
        except (RuntimeError, NotImplementedError):
            self._csr = None
            self._no_csr.add(device)
        return self._csr

    def _apply_sparse(self, rows: Tensor) -> Tensor:
        matrix = self._sparse_matrix(rows.device)
        if matrix is not None:  # one sparse product instead of s scatter-adds (same numbers)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return (matrix @ rows.T).T.contiguous()
        indices, values = self._sparse_all()
        indices = indices.to(rows.device)
        values = values.to(device=rows.device, dtype=self.dtype)
        out = torch.zeros(rows.shape[0], self.out_dim, dtype=self.dtype, device=rows.device)
        for start in range(0, self.in_dim, self.block_size):
            stop = min(start + self.block_size, self.in_dim)
            part = rows[:, start:stop]
            for block in range(self.nonzeros):
                out.index_add_(1, indices[start:stop, block], part * values[start:stop, block])
        return out

    def blocks(self) -> Iterator[tuple[int, int, Tensor]]:
        """Yield ``(start, stop, Pᵀ[start:stop])`` float32 CPU blocks of about ``block_size`` rows (at least one
        generation chunk) covering ``0..in_dim``; each block is a fresh tensor."""
        per_block = max(1, self.block_size // self.chunk_rows)
        for first in range(0, self.num_chunks, per_block):
            last = min(first + per_block, self.num_chunks)
            start = first * self.chunk_rows
            stop = min(last * self.chunk_rows, self.in_dim)
            block = torch.empty(stop - start, self.out_dim, dtype=torch.float32)
            for c in range(first, last):
                offset = (c - first) * self.chunk_rows
                self._fill(
                    c, block[offset : offset + min(self.chunk_rows, self.in_dim - c * self.chunk_rows)]
                )
            yield start, stop, block

    def matrix(self) -> Tensor:
        """The dense ``P [d, p]`` in :attr:`dtype` (small problems and tests only)."""
        if self.in_dim * self.out_dim > 1 << 26:
            raise ValueError(
                f"Refusing to materialise a {self.out_dim}x{self.in_dim} projection; call the projection on "
                "the data instead (it works block by block)."
            )
        return torch.cat([block for _, _, block in self.blocks()]).T.to(self.dtype)

    # --- application ------------------------------------------------------------------------------------

    def __call__(self, x: Tensor) -> Tensor:
        """Project ``x [n, p]`` (or ``[p]``) to ``[n, d]`` (or ``[d]``) in :attr:`dtype` on ``x.device``."""
        if not isinstance(x, Tensor) or x.dim() not in (1, 2) or x.shape[-1] != self.in_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"Expected a tensor of shape [n, {self.in_dim}] or [{self.in_dim}], got {shape}."
            )
        squeeze = x.dim() == 1
        rows = x.reshape(1, -1) if squeeze else x
        rows = rows.to(self.dtype)
        if self.kind == "sjlt":
            out = self._apply_sparse(rows)
        elif self._cache is not None or (0 < self.in_dim * self.out_dim <= self.cache_elements):
            if self._cache is None:
                self._cache = torch.cat([block for _, _, block in self.blocks()])
                self.peak_block_elements = max(self.peak_block_elements, self._cache.numel())
            out = rows @ self._cache.to(device=x.device, dtype=self.dtype)
        else:
            out = torch.zeros(rows.shape[0], self.out_dim, dtype=self.dtype, device=x.device)
            for start, stop, block in self.blocks():
                self.peak_block_elements = max(self.peak_block_elements, block.numel())
                out.addmm_(rows[:, start:stop], block.to(device=x.device, dtype=self.dtype))
        return out[0] if squeeze else out

    # --- persistence ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the same projection (JSON-friendly)."""
        return {
            "version": _STATE_VERSION,
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "seed": self.seed,
            "kind": self.kind,
            "block_size": self.block_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "cache_elements": self.cache_elements,
            "nonzeros": self.nonzeros,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> RandomProjection:
        """Rebuild from :meth:`state_dict`.

        Example:
            >>> p = RandomProjection(50, 4, seed=1, kind="rademacher")
            >>> q = RandomProjection.from_state_dict(p.state_dict())
            >>> torch.equal(p.matrix(), q.matrix())
            True
        """
        if not isinstance(state, dict):
            raise ValueError(
                f"Expected a dict from RandomProjection.state_dict(), got {type(state).__name__}."
            )
        version = state.get("version")
        if version != _STATE_VERSION:
            raise ValueError(
                f"Unsupported RandomProjection state version {version!r} (this code reads {_STATE_VERSION})."
            )
        missing = {"in_dim", "out_dim", "seed", "kind"} - set(state)
        if missing:
            raise ValueError(f"RandomProjection state is missing {sorted(missing)}.")
        dtype = getattr(torch, str(state.get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"Unknown dtype {state.get('dtype')!r} in RandomProjection state.")
        return cls(
            state["in_dim"],
            state["out_dim"],
            seed=state["seed"],
            kind=state["kind"],
            block_size=state.get("block_size", 65536),
            dtype=dtype,
            cache_elements=state.get("cache_elements", 1 << 25),
            nonzeros=state.get("nonzeros", 4),
        )
