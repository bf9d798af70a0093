"""The Megatron backend: LoRA training on megatron-core, tensor- and pipeline-parallel.

One process per rank, started by torchrun (`launch.py`); rank 0 is tinkerd's worker and sends
each batch of work to the other ranks, which run the same step (`backend.py`). Each rank holds its
slices of the base model (`model.py`, read from Hugging Face weights), its slices of every model's
LoRA adapters (`lora.py`) and their AdamW state, and runs the passes (`engine.py`). Checkpoints
are PEFT directories, gathered on rank 0, so the HF backend and PEFT read them as their own.
Work-arounds for megatron-core's CUDA assumptions, used only off CUDA, live in `cpu.py`.
"""
