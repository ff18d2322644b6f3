"""The occupancy each Triton kernel is designed for: resident blocks per SM on an H200.

Data, not a measurement: the launchers size their grids from it (small_c: programs = SMs ×
blocks per SM), the performance model (benchmarks/model_triton.py) takes it as an input, and the
ahead-of-time compile check (aot.py) fails when a kernel planned at a GPU target shape compiles
to fewer blocks per SM than written here. docs/gpu/ holds the compiled figures beside it.
"""

BLOCKS_PER_SM = {
    "small_c_kernel": 8,  # one warp a program: ≤ 255 registers give 8 (docs/design.md)
    "small_c_grad_weight_kernel": 2,
    "mean_denominator_kernel": 1,
    "row_norm_kernel": 2,
    "logits_kernel": 1,
    "row_lse_kernel": 4,
    "grad_x_kernel": 1,
    "grad_w_kernel": 1,
    "sum_kernel": 1,
    "project_kernel": 2,
}
