"""Serve MAS models on vLLM: a ``vllm.general_plugins`` plugin (``pip install 'segmask[vllm]'``).

    python -m vllm.entrypoints.openai.api_server --model runs/mas-full --dtype float32 \\
        --enforce-eager --no-enable-prefix-caching --no-enable-chunked-prefill

A model folder whose ``segmask.json`` (written by ``segmask train``) asks for ``mas`` or ``prefix`` is
prefilled under that mask, token for token as :func:`segmask.generate` prefills it; decoding is vLLM's.
Any other model is served unchanged. The pieces:

    plugin.py    register() (the entry point), the mask a folder asks for, the start checks
    prompts.py   prompt token ids -> segment ids, equal to segmask.encode_chat (no vLLM needed)
    model.py     the MAS subclasses of vLLM's Llama, Qwen2 and Qwen3 and their prefill hook

See the README, "Serving on vLLM", for what is tested (CPU) and what is not (GPU kernels, parallelism).
"""

from __future__ import annotations


def register() -> None:
    """The ``vllm.general_plugins`` entry point (see :func:`segmask.integrations.vllm.plugin.register`)."""
    from segmask.integrations.vllm.plugin import register as register_plugin

    register_plugin()
