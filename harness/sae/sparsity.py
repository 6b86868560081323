"""Achieved sparsity of a (pruned) SAE, stored with every pruned cell."""

from __future__ import annotations

from saex.sae.base import SAE

MATRICES = ("W_enc", "W_dec")


def sae_sparsity(sae: SAE, reference: SAE | None = None) -> dict[str, float]:
    """Achieved sparsity of a pruned SAE, as flat floats for the results store.

    - ``sparsity_W_enc`` / ``sparsity_W_dec``: share of exact zeros in each matrix of ``sae``;
    - ``d_sae``: latents of ``sae``;
    - ``sparsity``: 1 - (non-zero weights of W_enc and W_dec in ``sae``) / (weights of W_enc and W_dec in
      ``reference``, or in ``sae`` when no reference is given). With the unpruned SAE as reference this one
      number compares unstructured and structured pruning: dropping half the latents gives 0.5.
    - with a reference also ``latents_removed``: 1 - d_sae / reference d_sae.
    """
    zeros = {name: int((getattr(sae, name) == 0).sum()) for name in MATRICES}
    sizes = {name: getattr(sae, name).numel() for name in MATRICES}
    base = reference if reference is not None else sae
    total = sum(getattr(base, name).numel() for name in MATRICES)
    nonzero = sum(sizes[name] - zeros[name] for name in MATRICES)
    out = {f"sparsity_{name}": zeros[name] / sizes[name] for name in MATRICES}
    out["d_sae"] = float(sae.d_sae)
    out["sparsity"] = 1.0 - nonzero / total
    if reference is not None:
        out["latents_removed"] = 1.0 - sae.d_sae / reference.d_sae
    return out
