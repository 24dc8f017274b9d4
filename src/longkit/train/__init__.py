"""Training room: make a model long-context (long data with document masks, PoSE, LongLoRA, losses).

- :mod:`longkit.train.data`: local corpora, packing with per-document masks and position ids, length upsampling.
- :mod:`longkit.train.kv_retrieval`: synthetic key-value retrieval chats (``--data kv-retrieval``), answer-only loss.
- :mod:`longkit.train.recipes`: the recipe base class and the :data:`RECIPES` registry (``longkit methods --kind
  train``); one file per recipe: :mod:`longkit.train.continual`,
  :mod:`longkit.train.pose_recipe`, :mod:`longkit.train.longlora`.
- :mod:`longkit.train.pose`: PoSE's positional skip-wise position ids.
- :mod:`longkit.train.losses`: cross-entropy and LongCE.
- :mod:`longkit.train.chunked_ce`: the chunked cross-entropy ``loss=ce`` trains with (the LM head applied to
  the scored positions chunk by chunk; no float32 logits of the whole row).

Shifted sparse attention (S²-Attn, LongLoRA) is an attention method: ``attention/s2_attn.py``. The training run
itself (Trainer, checkpoints, saving) is above the seam: :mod:`longkit.runtime.train`.
"""

from longkit.train import continual, longlora, pose_recipe  # noqa: F401  (recipe registration)
from longkit.train.recipes import RECIPES, Recipe, create_recipe, register_recipe

__all__ = ["RECIPES", "Recipe", "create_recipe", "register_recipe"]
