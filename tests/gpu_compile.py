"""Compile every GPU configuration of a kernel module ahead of time, for a named target, without a GPU.

The interpreter accepts programs the GPU compiler rejects (dot shapes, shared-memory overflow, type errors in
compiled-only paths), so each kernel module lists what a GPU run can select in `gpu_compile_configs()`, and the
tests compile all of it here with Triton's bundled ptxas. Run as a script in a subprocess: the kernels must be
imported with TRITON_INTERPRET unset, which the test process (interpreting) cannot do.

`gpu_compile_configs()` yields (kernel, signature, constexprs, options) or (kernel, signature, constexprs, options,
attrs) tuples. `attrs` (optional, may be None) adds the argument attributes Triton's launch specializes, e.g. the
16-divisibility of pointers and integers (which a launch with suitably aligned arguments gets, and which lets loads
vectorize): {argument name or (argument index,): [["tt.divisibility", 16]]}, passed to ASTSource keyed by
argument index, which triton 3.6 through 3.8 accept alike. A module whose `gpu_compile_configs` takes an `arch`
argument is asked for the configurations of that compute capability (one of ARCHS) only; `configurations(module,
arch)` gives the list the records below follow, one record per configuration, in order.

Every architecture users train on is compiled: A100 (sm_80), RTX 30xx (sm_86), RTX 40xx (sm_89), H100/H200 (sm_90)
and RTX 50xx (sm_120), each against its own shared-memory limit.

    python tests/gpu_compile.py fastunet.kernels.group_norm 90        -> one JSON line per configuration
    python tests/gpu_compile.py fastunet.kernels.group_norm 90 1 2    -> configurations 1, 3, 5, ... only
"""

import importlib
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

# Largest (opt-in) shared memory per block in bytes, `shared_memory_per_block_optin` of each architecture: A100
# 163 KB, the consumer cards (RTX 30/40/50: sm_86, sm_89, sm_120) 99 KB, H100/H200 227 KB.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 120: 101376}
ARCHS = tuple(SHARED_MEMORY_LIMIT)


def ptxas_path(arch):
    """Triton's bundled ptxas for sm_`arch`: Triton ships a separate one for Blackwell (sm_100 and later)."""
    import triton

    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    blackwell = bin_dir / "ptxas-blackwell"
    return blackwell if arch >= 100 and blackwell.exists() else bin_dir / "ptxas"


def gpu_name(arch):
    """The ptxas target Triton compiles sm_`arch` for: the arch-specific 'a' variant from sm_90 on."""
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def ptxas_report(ptx, arch):
    """Registers and spill bytes of one kernel, from Triton's bundled ptxas."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        run = subprocess.run([str(ptxas_path(arch)), "-v", f"--gpu-name={gpu_name(arch)}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    text = run.stdout + run.stderr
    registers = max((int(n) for n in re.findall(r"Used (\d+) registers", text)), default=0)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", text))
    return registers, spills


def configurations(module, arch):
    """The module's configurations for sm_`arch`, each as a 5-tuple (attrs None where the module gave 4)."""
    listing = module.gpu_compile_configs
    configs = listing(arch=arch) if "arch" in inspect.signature(listing).parameters else listing()
    return [(*config, None) if len(config) == 4 else tuple(config) for config in configs]


def triton_attrs(kernel, attrs):
    """`attrs` keyed as ASTSource takes them, by the argument's index path: {(index,): [[name, value], ...]}; keys
    may be given as argument names, indices or index tuples."""
    def path(key):
        if isinstance(key, str):
            return (kernel.arg_names.index(key),)
        return (key,) if isinstance(key, int) else tuple(key)

    return {path(key): [list(attr) for attr in specs] for key, specs in (attrs or {}).items()}


def compile_module(module_name, arch, part=0, parts=1):
    """Records of compiling configurations part, part + parts, part + 2 * parts, ... of the module for sm_`arch`."""
    import triton
    from triton.backends.compiler import GPUTarget

    module = importlib.import_module(module_name)
    for kernel, signature, constexprs, options, attrs in configurations(module, arch)[part::parts]:
        attrs = triton_attrs(kernel, attrs)
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        name = f"{kernel.__name__}[{', '.join(f'{k}={v}' for k, v in {**constexprs, **options}.items())}]"
        if attrs:
            hints = sorted(kernel.arg_names[key[0]] for key, specs in attrs.items()
                           if ["tt.divisibility", 16] in specs)
            name += f" divisible16({','.join(hints)})"
        record = {"name": name}
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as error:  # report every failing configuration, not only the first
            record["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
        else:
            record["shared"] = compiled.metadata.shared
            record["registers"], record["spills"] = ptxas_report(compiled.asm["ptx"], arch)
            record["tensor_cores"] = any(op in compiled.asm["ptx"] for op in ("mma.sync", "wgmma"))
        yield record


def compile_in_subprocess(module_name, arch, part=0, parts=1):
    """compile_module's records, from a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, module_name, str(arch), str(part), str(parts)],
                         capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"compiling {module_name} for sm_{arch} crashed:\n{run.stderr[-4000:]}")
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def compile_for_archs(module_name, archs=ARCHS, workers=2):
    """{arch: records, in configuration order} for each of `archs`. Each architecture's configurations are dealt
    into `workers` parts, and the parts of all architectures run as subprocesses `workers` at a time (this machine
    has 2 cores): the cores stay busy to the end, where a subprocess per architecture left one idle for the
    fifth."""
    import concurrent.futures

    jobs = [(arch, part) for arch in archs for part in range(workers)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        parts = dict(zip(jobs, pool.map(lambda job: compile_in_subprocess(module_name, *job, workers), jobs)))
    records = {}
    for arch in archs:
        dealt = [parts[arch, part] for part in range(workers)]
        total = sum(map(len, dealt))
        if all(len(records_) == len(range(part, total, workers)) for part, records_ in enumerate(dealt)):
            records[arch] = [dealt[i % workers][i // workers] for i in range(total)]
        else:  # a part came back short: keep what came, for the caller's count check to report
            records[arch] = [record for records_ in dealt for record in records_]
    return records


def assert_every_config_compiles_cleanly(module_name, spill_bytes_allowed=0, archs=ARCHS):
    """Every configuration of `module_name` compiles for each of `archs` (all five by default), within that
    architecture's shared memory, and spills at most `spill_bytes_allowed` bytes of registers (0 unless a caller
    has shown where a spill sits and why it is cheap)."""
    module = importlib.import_module(module_name)
    for arch, records in compile_for_archs(module_name, archs).items():
        expected = len(configurations(module, arch))
        assert len(records) == expected, f"sm_{arch}: {len(records)} of {expected} configurations reported"
        failed = [r for r in records if "error" in r]
        assert not failed, f"sm_{arch}: {len(failed)} configurations failed, first: {failed[0]}"
        for record in records:
            assert record["shared"] <= SHARED_MEMORY_LIMIT[arch], f"sm_{arch}: shared memory over the limit in {record}"
            assert record["spills"] <= spill_bytes_allowed, f"sm_{arch}: register spills in {record}"


if __name__ == "__main__":
    for result in compile_module(sys.argv[1], *map(int, sys.argv[2:])):
        print(json.dumps(result), flush=True)
