"""Static cost sections of the fused norms (kernels/group_norm.py, kernels/rms_norm.py) for bench/static_report.py.

    python bench/static_report.py static_norm

Each norm's forward and backward launches as the Unet makes them: Unet(dim=64, dim_mults=(1, 2, 4, 8)), batch 32,
128x128 down to 16x16, bf16 activations (fp32 weight/bias/g under autocast, scale/shift the two halves of the bf16
time-MLP output), G=8, NCHW; plus batch 1 at 128x128. The launchers plan for the report's device (SM count, L2).

L2 model of the bytes moved (CPU-derived): a pass that re-reads data another pass of the same program read
earlier finds the most recently read `L2 bytes` of everything in flight, so a fraction max(0, 1 - L2 / in flight)
of the re-read comes from HBM; "in flight" is the programs' groups held between the passes (x, and dy in the
backward). A second launch re-reading the whole tensor finds min(1, L2 / tensor bytes) of it in L2.
"""

import torch

import static_report as report
from fastunet.kernels import group_norm as gn
from fastunet.kernels import rms_norm as rn

BATCH = 32
GROUPS = 8
DTYPE = torch.bfloat16
# (channels, side) of each distinct norm shape in Unet(dim=64, dim_mults=(1, 2, 4, 8)) at 128x128: the down
# stages' blocks (64@128, 64@64, 128@32, 256@16), the middle (512@16), the up stages' (512@16, 256@32, 128@64,
# 64@128), the final block (64@128).
UNET_SHAPES = [(64, 128), (64, 64), (128, 64), (128, 32), (256, 32), (256, 16), (512, 16)]


def _device_limits(device):
    """What the planners' device_limits returns for the report's device."""
    return lambda _torch_device: (device.num_sms, device.l2_bytes)


def _inputs(batch, channels, side):
    """x, weight, bias, g (fp32) and the scale/shift halves of a bf16 time-MLP output: CPU tensors, never read."""
    x = torch.empty(batch, channels, side, side, dtype=DTYPE)
    time_mlp = torch.empty(batch, 2 * channels, dtype=DTYPE)
    scale, shift = time_mlp.chunk(2, dim=1)
    return x, torch.empty(channels), torch.empty(channels), scale, shift


def _miss(in_flight, l2_bytes):
    return max(0.0, 1.0 - l2_bytes / in_flight) if in_flight else 0.0


def _group_norm_launches(device, x, weight, bias, time_mlp, backward, candidate=0, candidates_seen=None):
    """The launches of one GroupNorm call (the Unet's: scale/shift the two halves of one (B, 2C) tensor), with the
    launcher's `candidate`-th timed plan (report.capture_launches)."""
    patches = {gn: {"device_limits": _device_limits(device)}}
    if backward:
        mean = torch.empty(x.shape[0], GROUPS)
        return report.capture_launches(
            lambda: gn.group_norm_backward(torch.empty_like(x), x, weight, bias, GROUPS, None, None, True, mean,
                                           torch.empty_like(mean), [True, True, True, False, False, True],
                                           scale_shift=time_mlp), patches, candidate, candidates_seen)
    return report.capture_launches(
        lambda: gn.group_norm_forward(x, weight, bias, GROUPS, None, None, True, 1e-5, scale_shift=time_mlp),
        patches, candidate, candidates_seen)


def _group_norm_rows(device, batch, channels, side, backward):
    """The rows of one call with the plan it runs before any timing, and, where the launcher times several
    (gn.plan_candidates), a row for each other one: "timed candidate", its rounds of packs."""
    x, weight, bias, scale, shift = _inputs(batch, channels, side)
    time_mlp = scale._base  # the Unet's call: the two halves of one (B, 2C) tensor, taken whole
    candidates = []
    launches = _group_norm_launches(device, x, weight, bias, time_mlp, backward, candidates_seen=candidates)
    norm_launches = [launch for launch in launches if "group_norm" in launch.kernel.__name__]
    tile_launch = norm_launches[0]
    constants = tile_launch.kwargs
    tile_elements = constants["BLOCK_ROWS"] * constants["BLOCK_PIXELS"]
    x_bytes = x.numel() * x.element_size()
    streams = 2 if backward else 1  # tensors read twice: x (and dy)
    minimum = (3 if backward else 2) * x_bytes
    shape = f"{batch}x{channels}x{side}x{side}"
    direction = "bwd" if backward else "fwd"

    def fused_row(label, launch):
        # One fused launch: each program holds its pack between phase A and phase B.
        pack_bytes = x_bytes * streams // (batch * GROUPS) * _groups_per_pack(launch)
        in_flight = min(launch.programs, _num_packs(launch)) * pack_bytes
        moved = minimum + streams * x_bytes * _miss(in_flight, device.l2_bytes)
        return report.kernel_row(label, launch, device, tile_elements=tile_elements, elements=x.numel(),
                                 element_size=x.element_size(), bytes_moved=moved, bytes_minimum=minimum)

    rows = []
    if len(norm_launches) == 1:
        rows.append(fused_row(f"{direction} {shape}", tile_launch))
    else:
        # Split path: launch 1 reads x (and dy) once in its first tile loop; launch 2 re-reads them in its last
        # tile loop and writes the output. The op's minimum is split between them: the reads, then the write.
        first_read = streams * x_bytes
        second_read = first_read * _miss(first_read, device.l2_bytes)
        for index, (launch, loops, moved, least) in enumerate(zip(
                norm_launches, ([0], [-1]), (first_read, second_read + x_bytes), (first_read, x_bytes))):
            rows.append(report.kernel_row(f"{direction} {shape} launch {index + 1}", launch, device,
                                          tile_elements=tile_elements, elements=x.numel(),
                                          element_size=x.element_size(), bytes_moved=moved, bytes_minimum=least,
                                          loops_run=loops))
    rows.extend(_parameter_grads_rows(device, launches, f"{direction} {shape}"))
    for other in range(1, max(candidates, default=1)):  # only fused plans have other candidates
        launch = _group_norm_launches(device, x, weight, bias, time_mlp, backward, other)[0]
        rounds = -(-_num_packs(launch) // launch.programs)
        rows.append(fused_row(f"{direction} {shape} timed candidate, {rounds} rounds", launch))
    return rows, len(launches)


def _parameter_grads_rows(device, launches, label):
    """A row for the parameter-gradient kernel of a backward, if it launched one: it reads the (2, B, C) fp32 sums
    of du * xhat and du, [BLOCK_BATCH, BLOCK_CHANNELS] per step (RMSNorm's (2, B, P, C) partials are summed over P
    by an ATen op first, which is not a Triton launch and has no row)."""
    rows = []
    for launch in launches:
        if "parameter_grads" not in launch.kernel.__name__:
            continue
        batch, channels = (launch.argument(name) for name in ("batch", "channels"))
        tile = launch.kwargs["BLOCK_BATCH"] * launch.kwargs["BLOCK_CHANNELS"]
        sum_bytes = 2 * batch * channels * 4
        # A few programs whose time is their steps' load latency, not bytes or issue: say how many steps.
        steps = -(-batch // launch.kwargs["BLOCK_BATCH"])
        label_steps = f"{label} parameter grads ({steps} step{'s' if steps > 1 else ''})"
        rows.append(report.kernel_row(label_steps, launch, device, tile_elements=tile, elements=batch * channels,
                                      element_size=4, bytes_moved=sum_bytes, bytes_minimum=sum_bytes))
    return rows


def _groups_per_pack(launch):
    return launch.argument("groups_per_pack")


def _num_packs(launch):
    return launch.argument("num_packs")


def _rms_norm_rows(device, batch, channels, side, backward):
    x, _, _, scale, _ = _inputs(batch, channels, side)
    time_mlp = scale._base
    g = torch.empty(channels)
    patches = {rn: {"device_limits": _device_limits(device)}} if hasattr(rn, "device_limits") else {}
    # A training step's calls: the forward saves rinv for the backward (at the Unet's 64+ channels).
    save_rinv = rn.rinv_pays(channels)
    if backward:
        rinv = torch.empty(batch, side * side) if save_rinv else None
        launches = report.capture_launches(
            lambda: rn.rms_norm_backward(torch.empty_like(x), x, g, None, None, True, 1e-12,
                                         [True, True, False, False, True], scale_shift=time_mlp, rinv=rinv), patches)
    else:
        launches = report.capture_launches(
            lambda: rn.rms_norm_forward(x, g, None, None, True, 1e-12, scale_shift=time_mlp, save_rinv=save_rinv),
            patches)
    launch = [launch for launch in launches if "rms_norm" in launch.kernel.__name__][0]
    tile_elements = launch.kwargs["BLOCK_CHANNELS"] * launch.kwargs["BLOCK_PIXELS"]
    x_bytes = x.numel() * x.element_size()
    # The minimum: x (and dy) read, y (or dx) written, and the saved rinv written once and read once.
    minimum = (3 if backward else 2) * x_bytes + (batch * side * side * 4 if save_rinv else 0)
    # A program re-reads only its own block of pixels over all channels (a few KB to 64 KB), within L1/L2.
    moved = minimum
    if backward:  # per-program partial sums of the parameter gradients, written in fp32
        moved += 2 * batch * channels * launch.programs // batch * 4
    shape = f"{batch}x{channels}x{side}x{side}"
    row = report.kernel_row(f"{'bwd' if backward else 'fwd'} {shape}", launch, device, tile_elements=tile_elements,
                            elements=x.numel(), element_size=x.element_size(), bytes_moved=moved,
                            bytes_minimum=minimum)
    return [row, *_parameter_grads_rows(device, launches, f"bwd {shape}")], len(launches)


def sections(device):
    cases = [(BATCH, channels, side) for channels, side in UNET_SHAPES] + [(1, 64, 128)]
    for title, rows_of in (("GroupNorm + scale/shift + SiLU (kernels/group_norm.py)", _group_norm_rows),
                           ("channel RMSNorm + scale/shift + SiLU (kernels/rms_norm.py)", _rms_norm_rows)):
        rows, launch_counts = [], []
        for backward in (False, True):
            for batch, channels, side in cases:
                case_rows, launches = rows_of(device, batch, channels, side, backward)
                rows.extend(case_rows)
                launch_counts.append(launches)
        notes = [f"Triton launches per call (forwards, then backwards, case by case): {launch_counts}. GPU kernels "
                 "per call including any torch ops: bench/kernel_count.py (bench_group_norm / bench_rms_norm)."]
        yield report.Section(f"{title}: Unet(dim=64) shapes, bf16 activations, fp32 parameters"
                             + (f", G={GROUPS}" if rows_of is _group_norm_rows else ""), rows, notes)
