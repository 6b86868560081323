"""Built-in compression plugins, one module per method: ``none``, ``magnitude`` (unstructured and N:M),
``wanda`` and ``sparsegpt`` (llm-compressor pruning), ``gptq`` and ``rtn`` (llm-compressor quantization),
``hqq`` (hqq's HQQLinear). ``llmcompressor_oneshot`` is the helper the llm-compressor methods share; it
registers nothing. docs/COMPRESSION.md is the guide to writing another one."""
