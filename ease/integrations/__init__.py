"""Bridges from ease to other libraries, each imported only when asked for.

- :mod:`ease.integrations.transformers`: :class:`~ease.integrations.transformers.L3TTrainer`,
  a ``transformers.Trainer`` that trains a Hugging Face Llama-layout decoder with
  ``layer_weights``, ``layer_lr_scales``, layer dropout and exit curricula
  (``pip install 'ease[hf]'``).
- :mod:`ease.integrations.lm_eval`: the ``"ease"`` model of lm-evaluation-harness
  (``pip install 'ease[eval]'``).

Importing this package imports neither library.
"""
