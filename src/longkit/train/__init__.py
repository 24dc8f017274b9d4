"""Training room: make a model long-context (long data with document masks, PoSE, LongLoRA, losses).

- :mod:`longkit.train.data`: local corpora, packing with per-document masks and position ids, length upsampling.
- :mod:`longkit.train.pose`: PoSE's positional skip-wise position ids.
- :mod:`longkit.train.losses`: cross-entropy and LongCE.

Shifted sparse attention (S²-Attn, LongLoRA) is an attention method: ``attention/s2_attn.py``.
"""
