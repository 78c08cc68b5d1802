"""Static cost sections of the linear attention kernels (kernels/linear_attention.py) for bench/static_report.py.

    python bench/static_report.py static_linear_attention

Everything here is derived on the CPU from the compiled code (ptxas, cuobjdump), never measured. Launches as the
Unet makes them: LinearAttention of Unet(dim=64, dim_mults=(1, 2, 4, 8)) at 128x128 runs in the three outer
stages, on 128x128, 64x64 and 32x32 maps (N = 16384, 4096, 1024; 16384 is also the issue's benchmark shape), the
to_qkv output (B, 3*heads*d, H, W) bf16 at batch 32, heads 4, d 32, with 4 fp32 memory slots (autocast); each
launch captured from the module's own launchers with the report device's SM count and shared memory.

Linear attention is memory-bound (about 24 FLOP per byte at d = 32, where the H100's ridge point is ~240), so its
rows read like the norms': each streaming launch walks (d, BLOCK_N) tiles of q, k, v (or dout) once, and its
issue and SFU floors are set against the HBM time of the bytes it must move. The minimum of each streaming launch
is its share of the op's (the forward reads q, k, v and writes out: 4 tensors of B*heads*d*N; the backward reads
q, k, v, dout and writes dq, dk, dv: 7); bytes/min adds what the split reduction costs on top: the (d, d) fp32
partials and statistics written by one launch and read by the next, and the (d, d) matrices the map launches load
before their loops. The combine launches move only those small fp32 matrices: their rows set their own traffic as
their minimum (bytes/min 1.00), so that their issue and SFU columns say whether they are negligible.
"""

import torch

import static_report as report
from fastunet.kernels import linear_attention as la

BATCH, HEADS, HEAD_DIM, MEM = 32, 4, 32, 4
SIDES = (128, 64, 32)  # the Unet's three outer stages at 128x128 input
DTYPE = torch.bfloat16
FP32 = 4
# The launches that stream (d, BLOCK_N) tiles, as the report names kernels: (tensors of B*heads*d*N elements they
# read or write, fp32 (d, d) matrices and (d,) vectors each of their programs reads or writes besides).
STREAMING = {
    "context_partial_kernel": (2, 1, 2),  # k, v; the split's partial context out, its row max and sum
    "output_kernel": (2, 1, 0),  # q, out; the context in
    "query_grad_kernel": (3, 2, 0),  # q, dout, dq; the context in, the split's partial dcontext out
    "key_value_grad_kernel": (4, 2, 3),  # k, v, dk, dv; dcontext and its transpose, lse twice and the row dots in
}


def _patches(device):
    """The launchers' device queries, answered for the report's device (the tensors are on the CPU)."""
    return {la: {"_sm_count": lambda _index: device.num_sms,
                 "_shared_memory": lambda _index: device.shared_memory_per_block},
            torch.cuda: {"current_device": lambda: 0}}


def _launches(device, side):
    """(forward launches, backward launches) of the packed op's launchers on one map side."""
    qkv = torch.empty(BATCH, 3 * HEADS * HEAD_DIM, side, side, dtype=DTYPE)
    mem_kv = torch.empty(2, HEADS, HEAD_DIM, MEM)  # fp32 parameters beside bf16 activations, as under autocast
    q, k, v = la._qkv_views(qkv, HEADS)
    out = torch.empty(BATCH, HEADS * HEAD_DIM, side, side, dtype=DTYPE)
    out_heads = out.flatten(2).unflatten(1, q.shape[1:3])
    context = torch.empty(BATCH, HEADS, HEAD_DIM, HEAD_DIM)
    lse = torch.empty(BATCH, HEADS, HEAD_DIM)
    dqkv = torch.empty_like(qkv)
    dq, dk, dv = la._qkv_views(dqkv, HEADS)
    dmem_kv = torch.empty_like(mem_kv)
    patches = _patches(device)
    forward = report.capture_launches(lambda: la._forward(q, k, v, mem_kv[0], mem_kv[1], 0, out_heads), patches)
    backward = report.capture_launches(
        lambda: la._backward(out_heads, q, k, v, mem_kv[0], mem_kv[1], context, lse, 0, dq, dk, dv, dmem_kv[0],
                             dmem_kv[1]), patches)
    return forward, backward


def _row(label, launch, device, n):
    """One row: streaming launches against their share of the op's minimum, combine launches against their own
    traffic."""
    name = launch.kernel.__name__.strip("_")
    batch_heads = BATCH * HEADS
    elements = batch_heads * HEAD_DIM * n  # of one (B, heads, d, N) tensor
    tensor_bytes = elements * DTYPE.itemsize
    matrix_bytes = batch_heads * HEAD_DIM * HEAD_DIM * FP32  # one (d, d) fp32 matrix per (b, head)
    row_bytes = batch_heads * HEAD_DIM * FP32  # one (d,) fp32 vector per (b, head)
    constants = launch.kwargs
    if name in STREAMING:
        tensors, matrices, vectors = STREAMING[name]
        minimum = tensors * tensor_bytes
        programs_per_head = launch.grid[1]
        extra = programs_per_head * (matrices * matrix_bytes + vectors * row_bytes)
        return report.kernel_row(label, launch, device, tile_elements=HEAD_DIM * constants["BLOCK_N"],
                                 elements=elements, element_size=DTYPE.itemsize, bytes_moved=minimum + extra,
                                 bytes_minimum=minimum)
    # Combine launches: the partials of the previous launch's splits, one (ROWS, d) block of each per step.
    previous_splits = launch.argument("splits")
    traffic = previous_splits * matrix_bytes + 2 * matrix_bytes
    return report.kernel_row(label, launch, device, tile_elements=constants["ROWS"] * HEAD_DIM,
                             elements=batch_heads * previous_splits * HEAD_DIM * HEAD_DIM, element_size=FP32,
                             bytes_moved=traffic, bytes_minimum=traffic)


def _bound_us(row):
    """The launch's time if the slowest of issue, SFU and its modelled HBM bytes limited it."""
    return max(row.issue_us, row.sfu_us, row.hbm_us * row.bytes_moved / row.bytes_minimum)


def sections(device):
    for side in SIDES:
        n = side * side
        rows = []
        notes = []
        forward, backward = _launches(device, side)
        for direction, launches in (("fwd", forward), ("bwd", backward)):
            direction_rows = [_row(f"{direction} B{BATCH} N{n}", launch, device, n) for launch in launches]
            rows.extend(direction_rows)
            # The op's minimum: the streaming launches' shares (the combine rows' minimum is their own overhead).
            minimum_us = sum(row.hbm_us for row in direction_rows if row.kernel in STREAMING)
            bound_us = sum(_bound_us(row) for row in direction_rows)
            notes.append(f"{direction}: HBM floor of the op {minimum_us:.1f} us; the launches' sum of max(issue, SFU, "
                         f"modelled bytes) {bound_us:.1f} us, so at best {minimum_us / bound_us:.0%} of HBM bandwidth "
                         "(launch gaps and tails not counted)")
        notes.append(f"Triton launches: forward {len(forward)}, backward {len(backward)} (GPU kernels per layer, "
                     "torch ops included: bench/kernel_count.py).")
        yield report.Section(f"linear attention (kernels/linear_attention.py): bf16, heads {HEADS}, d {HEAD_DIM}, "
                             f"M {MEM} fp32 slots, N {n}", rows, notes)
