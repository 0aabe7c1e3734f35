"""model.OV / model.QK as a factored matrix A @ B: TransformerLens's FactoredMatrix where it is installed,
else this small class with its core methods (tlshim never installs TransformerLens)."""

from __future__ import annotations

import importlib.util

import torch


class FactoredMatrix:
    """A (..., ldim, mdim) @ B (..., mdim, rdim), kept factored; leading axes broadcast."""

    def __init__(self, A, B):
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"FactoredMatrix needs A's last axis to match B's second last: {tuple(A.shape)} @ {tuple(B.shape)}")
        self.A, self.B = A, B
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        self.shape = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2]) + (self.ldim, self.rdim)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def AB(self):
        return self.A @ self.B

    @property
    def BA(self):
        return self.B @ self.A

    @property
    def T(self):
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):
            return FactoredMatrix(self.A, self.B @ other.AB) if self.mdim <= other.mdim else FactoredMatrix(self.AB @ other.A, other.B)
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other):
        return FactoredMatrix(other @ self.A, self.B)

    def __mul__(self, scalar):
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    def svd(self):
        """(U, S, V) of A @ B from the SVDs of the factors: U (..., ldim, mdim), V (..., rdim, mdim)."""
        Ua, Sa, Va = torch.svd(self.A)
        Ub, Sb, Vb = torch.svd(self.B)
        Um, Sm, Vm = torch.svd(Sa[..., :, None] * Va.transpose(-2, -1) @ Ub * Sb[..., None, :])
        return Ua @ Um, Sm, Vb @ Vm

    @property
    def U(self):
        return self.svd()[0]

    @property
    def S(self):
        return self.svd()[1]

    @property
    def V(self):
        return self.svd()[2]

    Vh = V  # TransformerLens's name for the same matrix

    @property
    def eigenvalues(self):
        """The non-zero eigenvalues of A @ B, as those of B @ A."""
        return torch.linalg.eig(self.BA).eigenvalues

    def norm(self):
        """Frobenius norm, from the singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    def collapse_l(self):
        """S V^T (..., mdim, rdim): A @ B with the left orthogonal factor removed."""
        U, S, V = self.svd()
        return S[..., :, None] * V.transpose(-2, -1)

    def collapse_r(self):
        """U S (..., ldim, mdim)."""
        U, S, V = self.svd()
        return U * S[..., None, :]

    def unsqueeze(self, dim):
        return FactoredMatrix(self.A.unsqueeze(dim), self.B.unsqueeze(dim))

    def get_corner(self, k=3):
        return self.A[..., :k, :] @ self.B[..., :, :k]

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > self.ndim - 2:
            raise IndexError(f"index {index} only selects leading axes of a factored matrix of shape {tuple(self.shape)}")
        return FactoredMatrix(self.A.expand(*self.shape[:-2], *self.A.shape[-2:])[index],
                              self.B.expand(*self.shape[:-2], *self.B.shape[-2:])[index])

    def __repr__(self):
        return f"FactoredMatrix: Shape({tuple(self.shape)}), Hidden Dim({self.mdim})"


def factored(A, B):
    """TransformerLens's FactoredMatrix(A, B) if transformer_lens is installed, else tlshim's."""
    if importlib.util.find_spec("transformer_lens") is not None:
        from transformer_lens.FactoredMatrix import FactoredMatrix as TLFactoredMatrix

        return TLFactoredMatrix(A, B)
    return FactoredMatrix(A, B)


def composition_scores(left, right):
    """||L @ R||_F / (||L||_F ||R||_F) for every (left, right) pair of leading indices (left's first),
    from the factored forms (TransformerLens's utils.composition_scores)."""
    l_lead, r_lead = left.ndim - 2, right.ndim - 2
    for i in range(l_lead):
        right = right.unsqueeze(i)
    for i in range(r_lead):
        left = left.unsqueeze(i + l_lead)
    new_left, new_right = left.collapse_l(), right.collapse_r()
    products = new_left @ new_right
    return products.norm(dim=(-2, -1)) / new_left.norm(dim=(-2, -1)) / new_right.norm(dim=(-2, -1))
