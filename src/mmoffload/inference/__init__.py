"""The inference side: ``mmraw:`` refs and their checks, the rollout client, ``generate``, and the vLLM
engine and server (the ``vllm`` extra, imported only by ``engine`` and ``server``)."""
