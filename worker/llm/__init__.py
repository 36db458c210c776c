"""A Llama-architecture decoder for the tree (``workload=llm``): tensor- and pipeline-parallel, loaded from Hugging
Face-format safetensors, checked token for token against transformers.

    shape.py       config.json / presets -> LlamaShape; layout and family checks (no torch: the supervisor uses it)
    checkpoint.py  the checkpoint folder: seeded random writer (presets), sliced reader
    model.py       RMSNorm, rotary (llama3 scaling), GQA attention with a static KV cache, SwiGLU; one stage, one TP slice
    engine.py      prefill / greedy decode, pipeline hand-off, CUDA-graph decode step
    worker.py      LLMWorker: the rank (phase timings for restarts included)
    reference.py   transformers' LlamaForCausalLM.generate on the same checkpoint (the check)

This package's __init__ imports nothing heavy: the supervisor imports shape.py while validating a config.
"""
