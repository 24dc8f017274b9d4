"""RaggedLayer.compact reads ``keep`` in the layout of the padded view the attention call saw.

With packed (ragged) heads the view is [each head's stored slots, padded to the longest | the new tokens], while
the storage after ``update`` is [each head's slots + new tokens]: a ``keep`` mask of the view must be mapped, or
decoding with per-head budgets drops the wrong slots (it used to drop the newest token of short heads).
"""

from __future__ import annotations

import torch

from longkit.kvcache.storage import RaggedLayer


def _heads(layer: RaggedLayer) -> list[torch.Tensor]:
    keys, _, valid, _ = layer.padded()
    return [keys[0, h][valid[0, h]] if valid is not None else keys[0, h] for h in range(keys.shape[1])]


def test_compact_after_a_ragged_update_keeps_the_slots_of_the_view():
    D = 4
    # (1, 2, 5, D): token t of head h has all entries 10*h + t
    k0 = (10 * torch.arange(2)[:, None] + torch.arange(5)[None, :]).float()[None, :, :, None].expand(1, 2, 5, D)
    layer = RaggedLayer()
    layer.update(k0, -k0)
    # head 0 keeps all 5 tokens, head 1 keeps tokens 0, 2, 4: the layer becomes packed
    layer.compact(torch.tensor([[[1, 1, 1, 1, 1], [1, 0, 1, 0, 1]]], dtype=torch.bool))
    assert layer.packed and layer.stored_lengths().tolist() == [[5, 3]]
    new = torch.full((1, 2, 1, D), 99.0)
    view_k, view_v = layer.update(new, -new)
    # the view: head 1's three tokens padded to 5, then the new token in slot 5
    assert view_k.shape[2] == 6 and layer.last_valid[0, 1].tolist() == [True, True, True, False, False, True]
    keep = layer.last_valid.clone()
    keep[0, 0, 0] = False  # evict head 0's first token, keep everything else (including both new tokens)
    layer.compact(keep)
    got = [h[:, 0].tolist() for h in _heads(layer)]
    assert got == [[1, 2, 3, 4, 99], [10, 12, 14, 99]]
    values = layer.padded()[1]
    assert values[0, 1, 3, 0].item() == -99.0
    assert layer.nbytes() == (9 * D * 2) * 4 + 2 * 8
