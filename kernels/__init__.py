"""hpc_train.kernels: CUDA sources (*.cu) for the device path and their NumPy references.

The fused optimizer, fp16/bf16 pack and bucket kernels land with the ZeRO issue;
until then reductions on device arrays use CuPy's own ufuncs.
"""
