"""Compile every GPU configuration of a kernel module ahead of time, for a named target, without a GPU.

The interpreter accepts programs the GPU compiler rejects (dot shapes, shared-memory overflow, type errors in
compiled-only paths), so each kernel module lists what a GPU run can select in `gpu_compile_configs()`, and the
tests compile all of it here with Triton's bundled ptxas. Run as a script in a subprocess: the kernels must be
imported with TRITON_INTERPRET unset, which the test process (interpreting) cannot do.

    python tests/gpu_compile.py fastunet.kernels.group_norm 90   -> one JSON line per configuration
"""

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

# Largest dynamic shared memory per block, in bytes: A100 (sm_80) and H100 (sm_90).
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}


def ptxas_report(ptx, arch):
    """Registers and spill bytes of one kernel, from Triton's bundled ptxas."""
    import triton

    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        run = subprocess.run([str(ptxas), "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    text = run.stdout + run.stderr
    registers = max((int(n) for n in re.findall(r"Used (\d+) registers", text)), default=0)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", text))
    return registers, spills


def compile_module(module_name, arch):
    import triton
    from triton.backends.compiler import GPUTarget

    module = importlib.import_module(module_name)
    for kernel, signature, constexprs, options in module.gpu_compile_configs():
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        name = f"{kernel.__name__}[{', '.join(f'{k}={v}' for k, v in {**constexprs, **options}.items())}]"
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


def compile_in_subprocess(module_name, arch):
    """Records of compiling every configuration of `module_name` for sm_`arch`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, module_name, str(arch)], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"compiling {module_name} for sm_{arch} crashed:\n{run.stderr[-4000:]}")
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


if __name__ == "__main__":
    for result in compile_module(sys.argv[1], int(sys.argv[2])):
        print(json.dumps(result), flush=True)
