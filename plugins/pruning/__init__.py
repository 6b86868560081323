"""Built-in SAE pruning strategies (the ``pruned:<entry>@<s>`` SAE source), one plugin module each:
``magnitude`` and ``wanda`` (unstructured, per output column of W_enc and W_dec) and ``latents`` (structured:
whole latents dropped, d_sae shrinks). ``common`` holds what they share, including ``sae_sparsity``, the
achieved-sparsity measurement. See docs/PRUNING.md."""
