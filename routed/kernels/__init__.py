"""Grouped-matmul kernels for the dropless dispatch backends (routed/model/dispatch_dropless.py).

grouped.py   the tiled grouped matmul with its custom VJP, and the XLA tile loop
tpu_gmm.py   Pallas Mosaic kernels (TPU)
gpu_gmm.py   Pallas Triton kernels (GPU), with the row gather fused
"""
