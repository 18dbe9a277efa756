"""Speed of resjax's training step, outside the core: ``python -m resjax.bench`` (``cli``), one
measurement per child process (``step``), the benchmarked models (``rows``), the PyTorch
references (``torch_twin``: the ResNets; ``torch_gpt``: GPT-2) and a profiler trace of the
compiled step grouped by op kind (``profile``)."""
