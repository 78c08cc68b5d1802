"""Static cost sections of the flash attention kernels (kernels/attention.py) for bench/static_report.py.

    python bench/static_report.py static_attention
    python bench/static_attention.py [path/to/another/kernels/attention.py]   # the same for another version

Everything here is derived on the CPU from the compiled code (ptxas, cuobjdump), never measured. Launches as the
Unet makes them: the to_qkv output (B, 3*heads*d, H, W) bf16, heads 4, d 32, 4 fp32 memory slots (autocast), batch
32, at the mid stage's N = 256 (16x16) and at N = 4096 (64x64), each launch captured from the module's own
launchers and compiled with the divisibility a real launch gets. Per kernel, besides the report's columns:
- MMA kinds: the tensor-core instructions in its main loop (HGMMA: sm_90 wgmma; HMMA: mma.sync);
- per step (one iteration of the main loop over the image keys or queries, plus, for dq, of its delta pass over
  the same keys): MMA instructions, waits on
  outstanding wgmma groups (WARPGROUP.DEPBAR: a wait after every dot means no MMA overlaps the softmax), MUFU.EX2
  (exp2), and all SASS instructions of one thread;
- matmuls executed per step vs the ones the FLOP count credits (forward 2 per key block; backward 5, as
  FlashAttention counts 2.5x the forward);
- ceilings in TFLOP/s (counted FLOPs), each if that resource alone limited the main loop, for the whole device:
  issue (one warp instruction per scheduler per clock) and exp2 (MUFU: 16 per SM per clock), against the dense
  bf16 tensor-core peak (989 TFLOP/s on H100 SXM).
"""

import dataclasses
import importlib.util
import pathlib
import sys

import torch

import static_report as report

BATCH, HEADS, HEAD_DIM, MEM = 32, 4, 32, 4
SIDES = (16, 64)  # N = 256 (the Unet's mid stage at 128x128 input... its 16x16 map) and N = 4096
DTYPE = torch.bfloat16
MUFU_PER_SM_PER_CLOCK = 16
TENSOR_PEAK_TFLOPS = 989.0
# Matmuls per main-loop step that the FLOP count credits: forward (q k^T, p v); the backward's 5 are split as
# FlashAttention-2 executes them: dq (q k^T again, dO v^T, dS k) and dk/dv (k q^T again, p^T dO, v dO^T, dS^T q).
COUNTED = {"forward": 2, "dq": 2, "dkdv": 3, "delta": 0, "memory": 0}
EXECUTED = {"forward": 2, "dq": 3, "dkdv": 4, "delta": 0, "memory": 4}
# Where the dq kernel first passes over the keys for delta = rowsum(p dp) / rowsum(p) (q k^T and dO v^T again),
# each step of the image keys executes these two more.
DELTA_PASS_MATMULS = 2


def _role(kernel_name):
    for role in ("forward", "dkdv", "dq", "delta", "memory"):
        if role in kernel_name:
            return role
    return kernel_name


def _patched_config(module, arch):
    table = module._GPU_CONFIGS[module._table_arch(arch)]

    def config(kernel, dtype, head_dim, device):
        return table[kernel][module._dot_precision(dtype)][head_dim]
    return config


def _tensors(side):
    n = side * side
    qkv = torch.empty(BATCH, 3 * HEADS * HEAD_DIM, side, side, dtype=DTYPE)
    q, k, v = qkv.flatten(2).unflatten(1, (3, HEADS, HEAD_DIM)).transpose(-1, -2).unbind(1)
    mem_kv = torch.empty(2, HEADS, MEM, HEAD_DIM)
    out = torch.empty(BATCH, HEADS * HEAD_DIM, side, side, dtype=DTYPE)
    out_view = out.flatten(2).unflatten(1, (HEADS, HEAD_DIM)).transpose(-1, -2)
    lse = torch.empty(BATCH, HEADS, n)
    return q, k, v, mem_kv, out_view, lse


def _launches(module, side, arch, candidate=0):
    """(forward launches, backward launches) of `module`'s launchers at this side, for sm_`arch`; with the
    autotuner's `candidate`-th configuration where it has one (0: the table's entry, as before any timing)."""
    q, k, v, mem_kv, out, lse = _tensors(side)
    config = _patched_config(module, arch)
    patches = {module: {"_config": config}}
    if hasattr(module, "_tuned_config"):
        def tuned(kernel, dtype, d, n, device, launch):
            candidates = module._candidates(module._table_arch(arch), kernel, dtype, d)
            return candidates[min(candidate, len(candidates) - 1)]
        patches[module]["_tuned_config"] = tuned
    scale = HEAD_DIM**-0.5
    if "out" in module._forward.__code__.co_varnames[:module._forward.__code__.co_argcount]:
        forward = report.capture_launches(lambda: module._forward(q, k, v, mem_kv[0], mem_kv[1], scale, out), patches)
        grads = [torch.empty_like(t) for t in (q, k, v)] + [torch.empty_like(mem_kv[0]), torch.empty_like(mem_kv[1])]
        backward_code = module._backward.__code__
        if "out" in backward_code.co_varnames[:backward_code.co_argcount]:  # before delta = rowsum(p dp) / rowsum(p)
            backward = report.capture_launches(
                lambda: module._backward(out, q, k, v, mem_kv[0], mem_kv[1], out, lse, scale, *grads), patches)
        else:
            backward = report.capture_launches(
                lambda: module._backward(out, q, k, v, mem_kv[0], mem_kv[1], lse, scale, *grads), patches)
    else:  # the version before the packed ops: _forward allocated the output, _backward the gradients
        forward = report.capture_launches(lambda: module._forward(q, k, v, mem_kv[0], mem_kv[1], scale), patches)
        backward = report.capture_launches(
            lambda: module._backward(out, q, k, v, mem_kv[0], mem_kv[1], out, lse, scale), patches)
    return forward, backward


def _key_loops(compiled, role):
    """The loops over the image keys (or queries), whose one iteration each makes a step: the last innermost loop
    with tensor-core instructions (the memory-slot loop, when there is one, comes before it), and for the dq
    kernel with a delta pass also that pass's (MMA loops: delta memory slots, delta keys, dq memory slots, dq
    keys)."""
    loops = [loop for loop in report.innermost_loops(compiled.sass)
             if any(i.opcode.startswith(("HGMMA", "HMMA")) for i in loop.instructions)]
    if role == "dq" and len(loops) >= 4:
        return [loops[-3], loops[-1]]
    return loops[-1:]


@dataclasses.dataclass
class StepFigures:
    """What one step of a launch's main loop executes (see the module docstring), for sm_90 or another arch."""

    kernel: str
    block_m: int
    block_n: int
    num_warps: int
    mma_kinds: list  # e.g. ["HGMMA.64x32x16.F32"]
    mma: int  # tensor-core instructions per step
    waits: int  # WARPGROUP.DEPBAR per step
    exp2: int  # MUFU.EX2 per step, one thread
    instructions: int  # SASS instructions per step, one thread
    executed: int  # matmuls per step
    counted: int  # matmuls per step the FLOP count credits
    issue_tflops: float
    exp2_tflops: float


def step_figures(launch, device):
    """The StepFigures of a launch, or None for a kernel without a tensor-core loop (a reduction pass)."""
    compiled = report.compile_launch(launch, device.arch)
    role = _role(compiled.name)
    loops = _key_loops(compiled, role)
    if not loops:
        return None
    kinds = sorted({".".join(i.opcode.split(".")[:3]) for loop in loops for i in loop.instructions
                    if i.opcode.startswith(("HGMMA", "HMMA"))})
    mma = sum(i.opcode.startswith(("HGMMA", "HMMA")) for loop in loops for i in loop.instructions)
    exp2 = sum(loop.count("MUFU.EX2") for loop in loops)
    instructions = sum(len(loop.instructions) for loop in loops)
    constants = compiled.constants
    block_m, block_n = constants.get("BLOCK_M", 0), constants.get("BLOCK_N", constants.get("BLOCK_MEM", 0))
    # Counted FLOPs per step: 2 per multiply-add, `COUNTED` matmuls of BLOCK_M x BLOCK_N x d.
    counted_flops = 2 * COUNTED.get(role, 0) * block_m * block_n * HEAD_DIM
    clock = device.clock_ghz * 1e9
    threads = compiled.num_warps * 32
    issue_s = instructions * compiled.num_warps / (device.schedulers_per_sm * clock)  # one SM, one program's step
    exp2_s = exp2 * threads / (MUFU_PER_SM_PER_CLOCK * clock)
    return StepFigures(
        kernel=compiled.name, block_m=block_m, block_n=block_n, num_warps=compiled.num_warps, mma_kinds=kinds,
        mma=mma, waits=sum(loop.count("WARPGROUP.DEPBAR") for loop in loops), exp2=exp2, instructions=instructions,
        executed=EXECUTED.get(role, 0) + DELTA_PASS_MATMULS * (len(loops) - 1), counted=COUNTED.get(role, 0),
        issue_tflops=counted_flops / issue_s * device.num_sms / 1e12 if issue_s else float("inf"),
        exp2_tflops=counted_flops / exp2_s * device.num_sms / 1e12 if exp2_s else float("inf"))


def _step_note(label, launch, device):
    """One line of attention figures for a launch (see the module docstring)."""
    step = step_figures(launch, device)
    if step is None:
        return f"{label} {report.compile_launch(launch, device.arch).name}: no tensor-core loop (a reduction pass)"
    return (f"{label} {step.kernel} [{step.block_m}x{step.block_n}, {step.num_warps} warps]: MMA "
            f"{', '.join(step.mma_kinds)}; per step {step.mma} MMA, {step.waits} waits, {step.exp2} EX2, "
            f"{step.instructions} instructions; matmuls executed/counted {step.executed}/{step.counted}; ceilings "
            f"issue {step.issue_tflops:.0f}, exp2 {step.exp2_tflops:.0f} TFLOP/s (tensor peak "
            f"{TENSOR_PEAK_TFLOPS:.0f})")


def _row(label, launch, device, side):
    n = side * side
    elements = BATCH * HEADS * n * HEAD_DIM
    minimum = 4 * elements * 2  # q, k, v read and one output written, bf16 (the backward moves ~2x more)
    return report.kernel_row(label, launch, device, tile_elements=1, elements=0, element_size=2,
                             bytes_moved=minimum, bytes_minimum=minimum, per_element=False)


def sections(device, module=None):
    module = module or importlib.import_module("fastunet.kernels.attention")
    for side in SIDES:
        n = side * side
        rows, notes = [], []
        forward, backward = _launches(module, side, device.arch)
        for direction, launches in (("fwd", forward), ("bwd", backward)):
            for launch in launches:
                label = f"{direction} B{BATCH} N{n}"
                rows.append(_row(label, launch, device, side))
                notes.append(_step_note(label, launch, device))
        if hasattr(module, "_candidates"):  # the autotuner's other candidates on this architecture
            for launch in [l for launches in _launches(module, side, device.arch, candidate=1) for l in launches]:
                role = _role(launch.kernel.__name__)
                if role not in ("forward", "dkdv", "dq") or len(module._candidates(
                        module._table_arch(device.arch), role, DTYPE, HEAD_DIM)) == 1:
                    continue
                notes.append("autotune candidate: " + _step_note(f"B{BATCH} N{n}", launch, device))
        notes.append(f"Triton launches: forward {len(forward)}, backward {len(backward)} (torch ops besides them are "
                     "counted by bench/kernel_count.py). The per-element and issue columns are left blank for these "
                     "compute-bound kernels: their main loop is read above.")
        yield report.Section(f"flash attention ({pathlib.Path(module.__file__).name}): bf16, heads {HEADS}, "
                             f"d {HEAD_DIM}, M {MEM} fp32 slots, N {n}", rows, notes)


def _load(path):
    """kernels/attention.py of another version, imported as a module of fastunet.kernels (its relative imports)."""
    spec = importlib.util.spec_from_file_location("fastunet.kernels._attention_under_report", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    module = _load(sys.argv[1]) if len(sys.argv) > 1 else None
    for section in sections(report.H100, module):
        print(report.format_section(section))
        print()
