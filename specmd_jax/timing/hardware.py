"""Hardware descriptions for the timing model: accelerator roofline and the host-to-device link.

Units are SI throughout: FLOP/s, bytes/s and seconds (1 GB/s = 1e9 bytes/s, 1 TFLOPS = 1e12 FLOP/s).
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator and the link that brings offloaded experts to it.

    Attributes:
      name: preset key or a free label.
      peak_flops: dense bf16 matrix throughput of the accelerator, FLOP/s.
      memory_bandwidth: device memory bandwidth, bytes/s.
      link_bandwidth: host-to-device bandwidth for one transfer, bytes/s; `math.inf` makes transfers free.
      transfer_latency: fixed cost of each transfer (setup and completion), seconds.
      source: where the figures come from, with estimates marked as such.
      host_flops: FLOP/s of the host CPU on expert math, for misses computed on the host (`miss="host"`);
        None when unknown.
      host_memory_bandwidth: host memory bandwidth the CPU reaches, bytes/s; None when unknown. Give both
        host figures or neither.
    """

    name: str
    peak_flops: float
    memory_bandwidth: float
    link_bandwidth: float
    transfer_latency: float
    source: str = ""
    host_flops: float | None = None
    host_memory_bandwidth: float | None = None

    def __post_init__(self):
        for field in ("peak_flops", "memory_bandwidth"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"Hardware.{field}: expected a finite number > 0, got {value!r}")
        link = self.link_bandwidth
        if isinstance(link, bool) or not isinstance(link, (int, float)) or math.isnan(link) or link <= 0:
            raise ValueError(f"Hardware.link_bandwidth: expected a number > 0 (math.inf for free transfers), got {link!r}")
        latency = self.transfer_latency
        if isinstance(latency, bool) or not isinstance(latency, (int, float)) or not math.isfinite(latency) or latency < 0:
            raise ValueError(f"Hardware.transfer_latency: expected a finite number of seconds >= 0, got {latency!r}")
        for field in ("host_flops", "host_memory_bandwidth"):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"Hardware.{field}: expected a finite number > 0 or None, got {value!r}")
        if (self.host_flops is None) != (self.host_memory_bandwidth is None):
            raise ValueError(
                f"Hardware: expected both host_flops and host_memory_bandwidth or neither, got host_flops="
                f"{self.host_flops!r} and host_memory_bandwidth={self.host_memory_bandwidth!r}"
            )

    @property
    def has_host_compute(self) -> bool:
        """Whether the host figures are set, so misses can be computed on the host."""
        return self.host_flops is not None

    def transfer_time(self, num_bytes: float) -> float:
        """Seconds one transfer of `num_bytes` occupies the link: latency + bytes / bandwidth."""
        return self.transfer_latency + num_bytes / self.link_bandwidth


# Per-transfer latency of a host-to-device DMA copy over PCIe.
# NOTE: an estimate (launch, DMA setup and completion of one copy of pinned memory); no vendor publishes it.
PCIE_TRANSFER_LATENCY = 10e-6

# Effective share of a PCIe link's nominal per-direction rate that a large pinned-memory copy reaches.
# NOTE: an estimate (about 80 %, after packet headers and flow control); measure the real host to use another.
PCIE_EFFICIENCY = 0.8

# PCIe 4.0 x16: 16 GT/s per lane, 16 lanes, 128b/130b encoding = 31.5 GB/s per direction (PCI-SIG
# PCIe 4.0 base specification; usually rounded to "32 GB/s").
PCIE4_X16_NOMINAL = 16e9 * 16 * 128 / 130 / 8
# PCIe 5.0 x16: 32 GT/s per lane, same encoding = 63 GB/s per direction (PCI-SIG PCIe 5.0 base specification).
PCIE5_X16_NOMINAL = 32e9 * 16 * 128 / 130 / 8

# NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM): BF16 Tensor Core 312 TFLOPS dense (624 with
# sparsity), GPU memory bandwidth 2,039 GB/s (HBM2e).
A100_BF16_FLOPS = 312e12
A100_MEMORY_BANDWIDTH = 2039e9

# NVIDIA H100 Tensor Core GPU datasheet (H100 SXM): BF16 Tensor Core 1,979 TFLOPS with sparsity, so
# 989 TFLOPS dense; GPU memory bandwidth 3.35 TB/s (HBM3).
H100_BF16_FLOPS = 989e12
H100_MEMORY_BANDWIDTH = 3.35e12

# NVIDIA GH200 Grace Hopper Superchip datasheet: the H100 GPU's 989 TFLOPS dense BF16 (1,979 with
# sparsity), 4 TB/s HBM3 (96 GB version), NVLink-C2C 900 GB/s total, so 450 GB/s per direction.
GH200_MEMORY_BANDWIDTH = 4.0e12
GH200_C2C_PER_DIRECTION = 450e9

# Apple MacBook Pro tech specifications (M3 Max, 16-core CPU, 40-core GPU): 400 GB/s unified memory bandwidth.
# Apple publishes no GPU FLOP/s.
M3_MAX_MEMORY_BANDWIDTH = 400e9
# NOTE: an estimate, 40 GPU cores x 128 FP32 lanes x 2 FLOP (fused multiply-add) x about 1.4 GHz = 14.3
# TFLOPS, taking bf16 at the FP32 rate.
M3_MAX_FLOPS = 14.3e12

# Google Cloud TPU v5e documentation, system architecture: 197 TFLOPS bf16 peak per chip, 819 GB/s HBM2
# bandwidth (16 GiB HBM).
TPU_V5E_BF16_FLOPS = 197e12
TPU_V5E_MEMORY_BANDWIDTH = 819e9

# Host CPUs, for misses computed on the host. Each preset gives one accelerator a whole CPU socket. On a
# server where several accelerators share a socket, divide both host figures by their number. The FLOP/s
# are the FP32 fused multiply-add peak of the CPU's SIMD units at base clock, with bf16 weights widened to
# FP32 (matrix units such as Intel AMX are not counted). NOTE: every host FLOP/s is an estimate of that
# kind, because CPU vendors publish no peak for this workload.
FP32_LANES_256 = 8  # FP32 values in one 256-bit vector
FP32_LANES_512 = 16
FP32_LANES_128 = 4
FLOPS_PER_FMA = 2

# NVIDIA DGX A100 (the reference host of the A100): two AMD EPYC 7742, 64 cores each at 2.25 GHz base
# (hardwaretimes.com DGX A100 article). Zen 2 has two 256-bit FMA units per core (Microway, "Detailed
# Specifications of the AMD EPYC Rome CPUs"): 64 x 2.25e9 x 2 x 8 x 2 = 4.6 TFLOPS FP32. Memory: eight
# channels of DDR4-3200 per socket, 8 x 3.2e9 x 8 bytes = 204.8 GB/s (same Microway page; Tom's Hardware
# quotes 204.8 GB/s per socket).
EPYC_7742_FLOPS = 64 * 2.25e9 * 2 * FP32_LANES_256 * FLOPS_PER_FMA
EPYC_7742_MEMORY_BANDWIDTH = 8 * 3.2e9 * 8

# NVIDIA DGX H100/H200 (the reference host of the H100): two Intel Xeon Platinum 8480C, 56 cores each at
# 2.0 GHz base (NVIDIA DGX H200 specifications). The MLPerf Inference v4.1 description of NVIDIA's H200
# system lists the same CPUs. Sapphire Rapids has two 512-bit FMA units per core (Chips and Cheese,
# Sapphire Rapids article): 56 x 2.0e9 x 2 x 16 x 2 = 7.2 TFLOPS FP32. Memory: eight DDR5 channels per
# socket (ServeTheHome, Xeon 8480+ diagram) at up to 4800 MT/s (SiSoftware, Sapphire Rapids preview).
# That is 8 x 4.8e9 x 8 bytes = 307.2 GB/s.
XEON_8480C_FLOPS = 56 * 2.0e9 * 2 * FP32_LANES_512 * FLOPS_PER_FMA
XEON_8480C_MEMORY_BANDWIDTH = 8 * 4.8e9 * 8

# NVIDIA Grace (the CPU of the GH200) has 72 Neoverse V2 cores with four 128-bit SVE2 units each. The
# two-CPU Grace Superchip peaks at 7.1 TFLOPS FP64 with up to 1 TB/s of LPDDR5X (hardwaretimes.com Grace
# announcement). So one CPU has 3.55 TFLOPS FP64, 7.1 TFLOPS FP32 at twice the lanes, and 500 GB/s.
GRACE_FLOPS = 7.1e12 / 2 * 2
GRACE_MEMORY_BANDWIDTH = 1e12 / 2

# Apple M3 Max CPU: 12 performance cores (Apple MacBook Pro tech specs) at up to about 4.05 GHz
# (cputronic.com M3 Max page; Apple publishes no clock).
# NOTE: an estimate, assuming four 128-bit FMA units per performance core and leaving out the 4
# efficiency cores: 12 x 4.05e9 x 4 x 4 x 2 = 1.6 TFLOPS FP32.
M3_MAX_CPU_FLOPS = 12 * 4.05e9 * 4 * FP32_LANES_128 * FLOPS_PER_FMA
# NOTE: an estimate. The CPU cores reach only part of the 400 GB/s that the whole chip has, as AnandTech
# found on the M1 Max ("Huge Memory Bandwidth, but not for every Block"). Half of it is assumed.
M3_MAX_CPU_MEMORY_BANDWIDTH = M3_MAX_MEMORY_BANDWIDTH / 2

PRESETS: dict[str, Hardware] = {
    "pcie4-a100": Hardware(
        name="pcie4-a100",
        peak_flops=A100_BF16_FLOPS,
        memory_bandwidth=A100_MEMORY_BANDWIDTH,
        link_bandwidth=PCIE_EFFICIENCY * PCIE4_X16_NOMINAL,  # about 25 GB/s, an estimate
        transfer_latency=PCIE_TRANSFER_LATENCY,
        source=(
            "A100 80GB SXM datasheet; PCIe 4.0 x16 at an estimated 80% of 31.5 GB/s; latency estimated; "
            "host: one EPYC 7742 socket of the DGX A100, FLOP/s estimated"
        ),
        host_flops=EPYC_7742_FLOPS,
        host_memory_bandwidth=EPYC_7742_MEMORY_BANDWIDTH,
    ),
    "pcie5-h100": Hardware(
        name="pcie5-h100",
        peak_flops=H100_BF16_FLOPS,
        memory_bandwidth=H100_MEMORY_BANDWIDTH,
        link_bandwidth=PCIE_EFFICIENCY * PCIE5_X16_NOMINAL,  # about 50 GB/s, an estimate
        transfer_latency=PCIE_TRANSFER_LATENCY,
        source=(
            "H100 SXM datasheet; PCIe 5.0 x16 at an estimated 80% of 63 GB/s; latency estimated; "
            "host: one Xeon Platinum 8480C socket of the DGX H100, FLOP/s estimated"
        ),
        host_flops=XEON_8480C_FLOPS,
        host_memory_bandwidth=XEON_8480C_MEMORY_BANDWIDTH,
    ),
    "nvlink-c2c-gh200": Hardware(
        name="nvlink-c2c-gh200",
        peak_flops=H100_BF16_FLOPS,
        memory_bandwidth=GH200_MEMORY_BANDWIDTH,
        # NOTE: an estimate, about 89% of the 450 GB/s per direction; Grace memory also bounds the rate.
        link_bandwidth=400e9,
        transfer_latency=5e-6,  # an estimate: no PCIe DMA setup, but still one copy launch
        source=(
            "GH200 datasheet; NVLink-C2C 450 GB/s per direction, 400 GB/s effective estimated; latency estimated; "
            "host: the Grace CPU, FLOP/s from its FP64 peak"
        ),
        host_flops=GRACE_FLOPS,
        host_memory_bandwidth=GRACE_MEMORY_BANDWIDTH,
    ),
    "apple-m3-max": Hardware(
        name="apple-m3-max",
        peak_flops=M3_MAX_FLOPS,
        memory_bandwidth=M3_MAX_MEMORY_BANDWIDTH,
        # The CPU and GPU share one memory, so a "transfer" is a copy into the GPU's working set: each
        # byte is read once and written once, which halves the memory bandwidth. An estimate.
        link_bandwidth=M3_MAX_MEMORY_BANDWIDTH / 2,
        transfer_latency=5e-6,  # an estimate
        source=(
            "MacBook Pro M3 Max tech specs (400 GB/s); GPU FLOP/s, copy rate and latency estimated; "
            "host: the 12 performance cores, FLOP/s and bandwidth estimated"
        ),
        host_flops=M3_MAX_CPU_FLOPS,
        host_memory_bandwidth=M3_MAX_CPU_MEMORY_BANDWIDTH,
    ),
    "tpu-v5e": Hardware(
        name="tpu-v5e",
        peak_flops=TPU_V5E_BF16_FLOPS,
        memory_bandwidth=TPU_V5E_MEMORY_BANDWIDTH,
        # NOTE: an estimate. Google publishes no per-chip host-to-device rate, so this assumes a PCIe
        # 4.0 x16-class link per chip at the same efficiency as the GPU presets.
        link_bandwidth=PCIE_EFFICIENCY * PCIE4_X16_NOMINAL,
        transfer_latency=PCIE_TRANSFER_LATENCY,
        source=(
            "Cloud TPU v5e documentation; host link and latency estimated (PCIe 4.0 x16-class); "
            "host CPU estimated as one EPYC 7742-class socket"
        ),
        # NOTE: an estimate. Google publishes no CPU model for a v5e host (8 chips and 512 GiB of DRAM per
        # host), so one socket like the A100 host's is assumed.
        host_flops=EPYC_7742_FLOPS,
        host_memory_bandwidth=EPYC_7742_MEMORY_BANDWIDTH,
    ),
    "constrained-5gbs": Hardware(
        name="constrained-5gbs",
        peak_flops=A100_BF16_FLOPS,
        memory_bandwidth=A100_MEMORY_BANDWIDTH,
        # A deliberately slow 5 GB/s link (a shared or narrowed PCIe link) for sensitivity studies.
        link_bandwidth=5e9,
        transfer_latency=PCIE_TRANSFER_LATENCY,
        source=(
            "A100 80GB SXM datasheet compute; a chosen 5 GB/s link; latency estimated; "
            "host: one EPYC 7742 socket of the DGX A100, FLOP/s estimated"
        ),
        host_flops=EPYC_7742_FLOPS,
        host_memory_bandwidth=EPYC_7742_MEMORY_BANDWIDTH,
    ),
}


def get_hardware(name: str) -> Hardware:
    """Return the hardware preset called `name`; raise `ValueError` listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown hardware preset '{name}': expected one of {', '.join(sorted(PRESETS))}") from None
