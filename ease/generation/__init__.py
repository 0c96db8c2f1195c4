"""Autoregressive generation that skips layers: KV cache, confident early exit, self-speculation.

Three ways to produce each new token, all over one preallocated :class:`KVCache`:

- **Full depth** (``routing_threshold=None``): every block runs for every token.
- **Confident early exit** (CALM, Schuster et al. 2022; :mod:`ease.generation.early_exit`):
  a token answers at the layer :class:`ease.exits.ExitRule` picks, and the keys and values
  of the layers it skips are filled from its exited hidden state (state propagation).
- **Self-speculative decoding** (LayerSkip, Elhoushi et al. 2024;
  :mod:`ease.generation.speculative`): the first ``draft_layers`` blocks draft tokens and
  the full model verifies them in one pass; lossless.

Prompts of different lengths share a batch: row ``b``'s position ``t`` lives in cache slot
``t`` of row ``b`` (:class:`CacheSlots`); each row reads only its own first
``position + 1`` slots, so slots past a row's end never matter. The prompt itself always
runs at full depth.

Modules, one idea each:

- :mod:`~ease.generation.api`: :func:`generate`, its argument checks, the output assembled;
- :mod:`~ease.generation.output`: :class:`GenerationOutput`;
- :mod:`~ease.generation.cache`: :class:`KVCache` and :class:`CacheSlots`;
- :mod:`~ease.generation.sampling`: the sampler and the speculative verification rule;
- :mod:`~ease.generation.early_exit`: prefill, the first token, the early-exit step with
  state propagation, the full-depth / early-exit loop;
- :mod:`~ease.generation.speculative`: the self-speculative loop.
"""

from ease.generation.api import generate
from ease.generation.cache import CacheSlots, KVCache
from ease.generation.output import GenerationOutput

__all__ = ["CacheSlots", "GenerationOutput", "KVCache", "generate"]
