"""Static cost report of the Triton kernels: what their compiled code says about speed, on CPU, without a GPU.

    python bench/static_report.py                 # every section module: bench/static_*.py
    python bench/static_report.py static_norm     # only the named ones

Everything printed is derived on the CPU from the compiled code (Triton's bundled ptxas and cuobjdump), never
measured on a GPU. For each kernel launch, at the Unet's shapes, on the report's device (H100 SXM, sm_90):
- grid: programs launched vs SMs, how many programs fit on one SM at once (registers, warps, shared memory), waves;
- registers, shared memory and spill bytes (ptxas -v);
- SASS instructions per element in each tile loop: the innermost loops of the SASS whose global loads and stores
  move a whole tile per thread and that do an fp32 operation per element (the loops over the data, as opposed to
  loops over groups or chunk statistics),
  counted statically (a predicated-off instruction still issues) and divided by the elements one thread handles
  per iteration; with the special-function (MUFU), shuffle (SHFL) and barrier (BAR) instructions among them.
  A kernel without any loop (one tile per program) counts its whole body instead, setup included, marked
  "(whole kernel)". They are counted in a second compile of the launch with its runtime on/off flags (bool
  arguments: has_residual, silu, ...) and its parameters' packed dtype codes made constants, so that the code a
  flag that is off, or another dtype's branch, jumps over is not counted; registers, shared memory and spills are
  those of the kernel that runs, with the flags as arguments;
- bytes moved (the section's L2 model) vs the minimum (each input read once, each output written once);
- issue floor vs HBM floor: warp instructions of the tile loops / (busy SMs x 4 schedulers x clock), busy SMs
  the fewer of the SMs and the programs, against minimum bytes / HBM bandwidth. An issue floor above ~0.6x the HBM floor means the kernel cannot reach its bandwidth
  target;
- SFU floor: the tile loops' special-function operations (MUFU: exp2, reciprocal, ...) at the SM's 16 per clock
  (sm_80 to sm_90), a pipe of its own beside the issue slots: a loop needs at least the larger of the two.

A launch is compiled exactly as a real launch would compile it: `capture_launches` runs the op's own launcher on
CPU tensors (torch.empty, never touched) with JITFunction.run intercepted, and `compile_launch` specializes the
captured arguments with Triton's own binder for the target (so pointers and ints get the 16-divisibility, and ints
equal to 1 become constants, as on the GPU), then compiles with triton.compile for that architecture.

Interface for section modules (bench/static_<op>.py, e.g. static_norm.py, static_attention.py):

    def sections(device: Device) -> Iterable[Section]

A Section is a title and a list of Rows; a Row is built by `kernel_row(...)` from one captured launch:

    launches = capture_launches(lambda: my_launcher(x, ...), patches={my_module: {"device_limits": ...}})
    row = kernel_row("fwd 32x64x128x128", launches[0], device, tile_elements=8 * 2048, elements=x.numel(),
                     element_size=2, bytes_moved=..., bytes_minimum=...)

`patches` replaces module attributes while the launcher runs (e.g. the device limits a planner reads, see
`device_patches`). Compiles are cached per (kernel, specialization, options) within one run.
"""

import contextlib
import dataclasses
import functools
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Optional

# The report compiles for a GPU: the kernels must be decorated by the compiler, not the interpreter.
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from fastunet.kernels import tuning  # noqa: E402

NVIDIA_BIN = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclasses.dataclass(frozen=True)
class Device:
    """The limits the report assumes (datasheet figures; the kernel planners see num_sms, l2_bytes and shared)."""

    name: str
    arch: int  # compute capability, 90 for sm_90
    num_sms: int
    l2_bytes: int
    shared_memory_per_block: int  # opt-in maximum of dynamic shared memory per block
    clock_ghz: float  # boost clock, for the issue floor
    hbm_bytes_per_s: float
    registers_per_sm: int = 65536
    special_functions_per_sm_per_clock: int = 16  # MUFU results per SM per clock (CUDA guide, cc 8.0-9.0)
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    shared_memory_per_sm: int = 233472
    schedulers_per_sm: int = 4


H100 = Device("H100 SXM", 90, 132, 50 << 20, 232448, 1.755, 3.35e12)


# ---------------------------------------------------------------------------------------------------------------
# Capturing launches


@dataclasses.dataclass
class Launch:
    """One kernel launch as the launcher made it: the JITFunction, its grid, positional and keyword arguments."""

    kernel: JITFunction
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def programs(self):
        return functools.reduce(lambda a, b: a * b, self.grid, 1)

    def argument(self, name):
        """The value the launch passed for the kernel's argument `name`, by keyword or by position."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[self.kernel.arg_names.index(name)]


def capture_launches(fn, patches=None, candidate=0, candidates_seen=None):
    """The launches `fn()` makes, in order, without running any kernel. patches: {module: {attribute: value}}
    replaced while fn runs. Where a launcher chooses among candidates by timing them (kernels/tuning.py), it takes
    the `candidate`-th (0: the one it runs before any timing; past the last, the last), and `candidates_seen`, a
    list, gets how many it had."""
    captured = []

    def record(self, *args, grid, warmup, **kwargs):
        captured.append(Launch(self, tuple(grid), args, kwargs))

    def choose(key, candidates, launch, same_bits):
        if candidates_seen is not None:
            candidates_seen.append(len(candidates))
        return candidates[min(candidate, len(candidates) - 1)]

    with contextlib.ExitStack() as stack:
        stack.enter_context(_replaced(JITFunction, "run", record))
        stack.enter_context(_replaced(tuning, "fastest", choose))
        for module, attributes in (patches or {}).items():
            for name, value in attributes.items():
                stack.enter_context(_replaced(module, name, value))
        fn()
    return captured


@contextlib.contextmanager
def _replaced(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


# ---------------------------------------------------------------------------------------------------------------
# Compiling and reading the SASS


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    text: str  # e.g. "@P2 LDG.E.EL.128 R12, desc[UR22][R22.64]"

    @property
    def opcode(self):
        return re.sub(r"^@!?U?P\w+\s+", "", self.text).split()[0]


@dataclasses.dataclass
class Compiled:
    name: str
    num_warps: int
    shared: int
    registers: int
    spills: int
    sass: list  # [Instruction]
    divisible16: tuple  # argument names Triton marked tt.divisibility=16
    constants: dict  # argument name -> value, constexprs and specialized ints


# Integer arguments that only select a branch (the norms' packed parameter dtypes), folded like the bool flags.
RUNTIME_SELECTORS = {"dtype_codes"}


def specialization(launch, arch, fold_flags=False):
    """(signature, constexprs, attrs, options) of `launch` on sm_`arch`, from Triton's own binder: exactly what a
    real launch with these argument values compiles. fold_flags: the bool arguments (runtime flags) and the packed
    dtype codes of the parameters (RUNTIME_SELECTORS) become constants of their launch values, so that the code
    they switch off, the branches of the other dtypes included, is compiled out (for counting what runs)."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, spec, options)
    if fold_flags:
        signature, constexprs = dict(signature), dict(constexprs)
        for index, (name, value) in enumerate(zip(kernel.arg_names, launch.args)):
            runtime_selector = isinstance(value, bool) or (name in RUNTIME_SELECTORS and isinstance(value, int))
            if runtime_selector and signature.get(name) != "constexpr":
                signature[name], constexprs[(index,)] = "constexpr", value
                attrs = {path: specs for path, specs in attrs.items() if path != (index,)}  # e.g. 0's divisibility
    return signature, constexprs, attrs, options


_COMPILED = {}


def compile_launch(launch, arch, fold_flags=False):
    """Compile `launch` for sm_`arch` as a GPU launch would, and read its registers, spills and SASS (cached).
    fold_flags: with its runtime flags as constants (specialization), for counting the instructions that run."""
    signature, constexprs, attrs, options = specialization(launch, arch, fold_flags)
    key = (launch.kernel.fn, arch, json.dumps(signature, sort_keys=True), repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
    if key not in _COMPILED:
        kernel = launch.kernel
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
        registers, spills = ptxas_registers_and_spills(compiled.asm["ptx"], arch)
        names = kernel.arg_names
        _COMPILED[key] = Compiled(
            name=kernel.__name__, num_warps=compiled.metadata.num_warps, shared=compiled.metadata.shared,
            registers=registers, spills=spills, sass=sass_instructions(compiled.asm["cubin"]),
            divisible16=tuple(names[path[0]] for path, specs in attrs.items() if ["tt.divisibility", 16] in specs),
            constants={names[path[0]]: value for path, value in constexprs.items()})
    return _COMPILED[key]


def ptxas_registers_and_spills(ptx, arch):
    """(registers, spill store bytes) of the kernel in `ptx`, from Triton's bundled ptxas."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        run = subprocess.run([str(NVIDIA_BIN / "ptxas"), "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    text = run.stdout + run.stderr
    registers = max((int(n) for n in re.findall(r"Used (\d+) registers", text)), default=0)
    return registers, sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", text))


def sass_instructions(cubin):
    """The SASS of a cubin (cuobjdump -sass) as a list of Instructions."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        run = subprocess.run([str(NVIDIA_BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                             check=True)
    finally:
        os.unlink(f.name)
    return [Instruction(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;/]*?)\s*;", run.stdout)]


@dataclasses.dataclass
class Loop:
    """An innermost loop of the SASS: the instructions from a backward branch's target to the branch."""

    instructions: list

    def count(self, prefix):
        return sum(i.opcode.startswith(prefix) for i in self.instructions)

    def global_bytes(self, element_size):
        """Bytes one thread loads from and stores to global memory per iteration in vectors or in elements of
        `element_size` bytes (loads of fp32 statistics, 4 bytes, are not tile data when the tile is 16-bit)."""
        widths = (_access_bytes(i.opcode) for i in self.instructions if i.opcode.startswith(("LDG", "STG")))
        return sum(width for width in widths if width in (8, 16, element_size))


def _access_bytes(opcode):
    widths = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
    return next((widths[part] for part in opcode.split(".") if part in widths), 4)


def innermost_loops(sass):
    """Loops (backward branches) that contain no other loop, in address order."""
    ranges = []
    for instruction in sass:
        match = re.search(r"\bBRA\s+(?:`\()?(0x[0-9a-f]+)", instruction.text)
        # A branch to itself is the trap after the kernel's last EXIT, not a loop.
        if match and int(match.group(1), 16) < instruction.address:
            ranges.append((int(match.group(1), 16), instruction.address))
    innermost = [(s, e) for s, e in ranges
                 if not any((s, e) != (s2, e2) and s <= s2 and e2 <= e for s2, e2 in ranges)]
    return [Loop([i for i in sass if s <= i.address <= e]) for s, e in sorted(innermost)]


def tile_loops(sass, elements_per_thread, element_size):
    """The innermost loops over the tensor, not over per-group or per-chunk statistics: those that move at least a
    tile's worth of data per thread (elements_per_thread elements of element_size bytes, in vectors or elements of
    that size) and do at least one fp32 operation per element."""
    return [loop for loop in innermost_loops(sass) if loop.global_bytes(element_size) >= elements_per_thread * element_size
            and loop.count("F") - loop.count("FSETP") - loop.count("FSEL") >= elements_per_thread]


# ---------------------------------------------------------------------------------------------------------------
# Rows and sections


@dataclasses.dataclass
class Row:
    label: str
    kernel: str
    programs: int
    resident: int  # programs one SM holds at once
    registers: int
    shared: int
    spills: int
    loop_instructions: list  # per tile loop: SASS instructions per element
    loop_special: list  # per tile loop: (MUFU, SHFL, BAR) per element
    bytes_moved: float
    bytes_minimum: float
    issue_us: float
    sfu_us: float
    hbm_us: float
    device: Device
    whole_kernel: bool = False  # no loops: the instructions are the whole kernel's, one tile per program
    per_element: bool = True  # False: a compute-bound kernel, whose per-element columns mean nothing ("-")

    def cells(self):
        waves = self.programs / (self.device.num_sms * max(1, self.resident))
        per_loop = " + ".join(f"{n:.1f}" for n in self.loop_instructions) or "-"
        if self.whole_kernel:
            per_loop += " (whole kernel)"
        special = " + ".join(f"{m:.2f}/{s:.2f}/{b:.3f}" for m, s, b in self.loop_special) or "-"
        floors = [f"{self.issue_us:.1f}", f"{self.sfu_us:.1f}", f"{self.hbm_us:.1f}",
                  f"{self.issue_us / self.hbm_us:.2f}", f"{self.sfu_us / self.hbm_us:.2f}"]
        if not self.per_element:
            per_loop = special = "-"
            floors = ["-", "-", floors[2], "-", "-"]
        return [self.label, self.kernel, f"{self.programs}", f"{self.resident}", f"{waves:.2f}",
                f"{self.registers}", f"{self.shared}", f"{self.spills}", per_loop, special,
                f"{self.bytes_moved / self.bytes_minimum:.2f}", *floors]


HEADER = ["launch", "kernel", "grid", "per SM", "waves", "regs", "smem", "spill", "instr/elem per tile loop",
          "MUFU/SHFL/BAR per elem", "bytes/min", "issue us", "SFU us", "HBM us", "issue/HBM", "SFU/HBM"]


@dataclasses.dataclass
class Section:
    title: str
    rows: list
    notes: list = dataclasses.field(default_factory=list)


def resident_programs(compiled, device):
    """Programs of this kernel one SM runs at once, limited by registers, threads, blocks and shared memory."""
    threads = compiled.num_warps * 32
    # Registers are allocated per warp in units of 256 (8 per thread, rounded up).
    registers_per_warp = -(-max(compiled.registers, 1) * 32 // 256) * 256
    limits = [device.registers_per_sm // (registers_per_warp * compiled.num_warps),
              device.max_threads_per_sm // threads, device.max_blocks_per_sm]
    if compiled.shared:
        limits.append(device.shared_memory_per_sm // (compiled.shared + 1024))
    return max(0, min(limits))


def kernel_row(label, launch, device, *, tile_elements, elements, element_size, bytes_moved, bytes_minimum,
               programs=None, loops_run=None, per_element=True):
    """A Row for one captured launch.

    tile_elements: elements one iteration of each tile loop handles per program; elements: elements each tile loop
    walks over the whole launch (x.numel() for a loop over the whole tensor); element_size: bytes of x's dtype;
    bytes_moved: the section's L2 model of the HBM traffic; bytes_minimum: each input read once, each output
    written once; programs: override of the launch's programs (default: its grid); loops_run: indices of the tile
    loops this launch runs (default all; a kernel whose runtime mode skips some, e.g. a split path's launches);
    per_element: False for a compute-bound kernel, whose row then leaves the per-element and issue columns blank.
    """
    compiled = compile_launch(launch, device.arch)
    counted = compile_launch(launch, device.arch, fold_flags=True)
    threads = compiled.num_warps * 32
    elements_per_thread = tile_elements / threads
    loops = tile_loops(counted.sass, elements_per_thread, element_size)
    whole_kernel = not loops and not innermost_loops(counted.sass)
    if whole_kernel:
        # A kernel without loops handles one tile per program: its whole body is the per-tile cost.
        loops = [Loop(counted.sass)]
    if loops_run is not None:
        loops = [loops[index] for index in loops_run]
    loop_instructions = [len(loop.instructions) / elements_per_thread for loop in loops]
    special = [tuple(loop.count(p) / elements_per_thread for p in ("MUFU", "SHFL", "BAR")) for loop in loops]
    # Warp instructions: each thread's per-element count, over 32 lanes of a warp.
    warp_instructions = sum(loop_instructions) * elements / 32
    # A grid of fewer programs than SMs leaves the others idle: only the busy ones issue.
    busy_sms = min(device.num_sms, programs or launch.programs)
    issue_us = warp_instructions / (busy_sms * device.schedulers_per_sm * device.clock_ghz * 1e9) * 1e6
    special_ops = sum(mufu for mufu, _, _ in special) * elements
    sfu_us = special_ops / (busy_sms * device.special_functions_per_sm_per_clock * device.clock_ghz * 1e9) * 1e6
    hbm_us = bytes_minimum / device.hbm_bytes_per_s * 1e6
    return Row(label, compiled.name.strip("_"), programs or launch.programs, resident_programs(compiled, device),
               compiled.registers, compiled.shared, compiled.spills, loop_instructions, special, bytes_moved,
               bytes_minimum, issue_us, sfu_us, hbm_us, device, whole_kernel, per_element)


def format_section(section):
    table = [HEADER] + [row.cells() for row in section.rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = [f"== {section.title}"]
    for r in table:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip())
    lines.extend(f"   {note}" for note in section.notes)
    return "\n".join(lines)


def section_modules(names=None):
    """The section modules: the named ones, or every bench/static_*.py but this one."""
    if not names:
        here = pathlib.Path(__file__).resolve().parent
        names = sorted(p.stem for p in here.glob("static_*.py") if p.stem != "static_report")
    return [importlib.import_module(name) for name in names]


def main(argv=None, device: Optional[Device] = None):
    device = device or H100
    print(f"Static cost report (CPU-derived from compiled code, not measured): {device.name}, sm_{device.arch}, "
          f"{device.num_sms} SMs, L2 {device.l2_bytes >> 20} MiB, {device.clock_ghz} GHz x "
          f"{device.schedulers_per_sm} schedulers, HBM {device.hbm_bytes_per_s / 1e12:.2f} TB/s; triton "
          f"{triton.__version__}.")
    print("instr/elem: SASS instructions of each tile loop's body per element one thread handles in an iteration; "
          "issue us: the tile loops' warp instructions / (busy SMs x schedulers x clock), busy SMs the fewer of the "
          "SMs and the programs; SFU us: their MUFU operations / "
          f"(busy SMs x {device.special_functions_per_sm_per_clock} per clock x clock); HBM us: minimum bytes / HBM "
          "bandwidth; bytes/min: the section's L2 model of HBM traffic over the minimum.")
    for module in section_modules(argv):
        for section in module.sections(device):
            print()
            print(format_section(section))


if __name__ == "__main__":
    main(sys.argv[1:])
