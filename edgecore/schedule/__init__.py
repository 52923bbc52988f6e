"""Scheduled execution of a compressed model: measured kernels chosen per layer within the memory budget.

LUC leaves every layer with its own sparsity and bit-width. Packed weights save memory but
are not faster by themselves, and which way of running a layer is fastest depends on its
format, on the shape of the work (one row while decoding, a thousand in a training step) and
on the device. This package makes that choice measured and automatic:

- `formats`: what a compressed weight is (shape, bits, sparsity) and how to read it;
- `kernels`: the ways to run one layer (dequantize just in time, keep it unpacked, torch's
  int8 / int4 weight-only matmuls, CSR sparse), each checked against the reference matmul;
- `costs`: microbenchmarks of every (shape, format, kernel, rows) on this machine, cached per
  device profile and machine, and the measured rest of the model, so a plan's time is predicted;
- `planner`: per layer, the kernel for no-grad input and for input that needs a gradient,
  the fastest combination whose predicted peak fits the budget;
- `executor`: installs a plan into the model (every forward then runs the chosen kernels)
  and streams frozen layers from a memory-mapped file when even the compressed weights do
  not fit (`streaming`).
"""
