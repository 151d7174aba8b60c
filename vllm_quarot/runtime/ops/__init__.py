"""The operators the kernels call: ``reference`` (plain PyTorch, ``torch.ops.quarot``:
the definition every faster op is tested against), ``cpu`` (csrc/cpu, ``torch.ops.quarot_cpu``)
and ``triton`` (``torch.ops.quarot_triton``)."""
