"""Built-in compression plugins, one module per method: ``none``, ``magnitude`` (unstructured and N:M),
``wanda`` and ``sparsegpt`` (llm-compressor pruning), ``gptq`` and ``rtn`` (llm-compressor quantization),
``hqq`` (hqq's HQQLinear), ``checkpoint`` (a compressed model from disk) and ``recipe`` (any llm-compressor
recipe). ``llmcompressor_oneshot``, ``layer_promises`` and ``checkpoint_formats`` are helpers; they register
nothing. docs/COMPRESSION.md is the guide to writing another one."""
