"""Edge device profiles: what the cost model needs to know about a device, and a catalog.

Units: bytes, FLOP/s, bytes/s, watts. `peak_flops` is the dense half-precision (FP16/BF16) matmul
rate a framework can use, except where a profile's `flops_precision` says otherwise (x86 CPUs
without native FP16 arithmetic give FP32).
"""

from __future__ import annotations

import dataclasses

GiB = 1024**3


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """What the cost model needs to know about one device.

    Attributes:
      name: catalog key, e.g. `"jetson-orin-nano-8gb"`.
      memory_bytes: memory usable for fine-tuning (total minus what the OS and other work keep).
      peak_flops: dense matmul rate in FLOP/s at `flops_precision`.
      mem_bandwidth_bytes_per_s: peak DRAM bandwidth.
      power_watts: typical power under sustained load (for energy estimates).
      flops_precision: the precision `peak_flops` is quoted at.
      description: one line for reports.
    """

    name: str
    memory_bytes: int
    peak_flops: float
    mem_bandwidth_bytes_per_s: float
    power_watts: float
    flops_precision: str = "fp16"
    description: str = ""

    def __post_init__(self):
        for f in ("memory_bytes", "peak_flops", "mem_bandwidth_bytes_per_s", "power_watts"):
            if not getattr(self, f) > 0:
                raise ValueError(f"DeviceProfile {self.name!r}: {f} must be > 0")


def _usable(total_gib: float, fraction: float) -> int:
    return int(total_gib * GiB * fraction)


# Figures from vendor spec sheets where the vendor publishes them; derived figures show their
# arithmetic; estimates not on a spec sheet say so. Jetson FP16 dense tensor rates are derived
# as SMs x 2048 dense FP16 FLOP/clk/SM (4 third-gen tensor cores x 256 FMA x 2) x GPU clock;
# the result is exactly 1/4 of the INT8 sparse TOPS NVIDIA quotes for the GPU, which checks it.
CATALOG: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            name="jetson-orin-nano-8gb",
            # NVIDIA Jetson Orin Nano Series datasheet: 8GB 128-bit LPDDR5, 68 GB/s; 1024 CUDA
            # cores / 32 tensor cores (8 SMs) at 625 MHz max; 7-15 W module power; 40 sparse INT8
            # TOPS. FP16 dense = 8 SM * 2048 FLOP/clk * 625 MHz = 10.24 TFLOPS (= 40.96 TOPS / 4).
            # (JetPack 6.1 "Super" mode: 1020 MHz, 102 GB/s, 25 W.) Usable: 75% of unified memory.
            memory_bytes=_usable(8, 0.75),
            peak_flops=8 * 2048 * 625e6,
            mem_bandwidth_bytes_per_s=68e9,
            power_watts=15.0,
            description="NVIDIA Jetson Orin Nano 8GB (Ampere GPU, 15 W mode)",
        ),
        DeviceProfile(
            name="jetson-orin-nx-16gb",
            # NVIDIA Jetson Orin NX Series datasheet: 16GB 128-bit LPDDR5, 102.4 GB/s; 1024 CUDA /
            # 32 tensor cores at 918 MHz max; 10-25 W; 100 sparse INT8 TOPS (GPU 60 + 2 DLA 40).
            # FP16 dense = 8 SM * 2048 * 918 MHz = 15.04 TFLOPS.
            memory_bytes=_usable(16, 0.75),
            peak_flops=8 * 2048 * 918e6,
            mem_bandwidth_bytes_per_s=102.4e9,
            power_watts=25.0,
            description="NVIDIA Jetson Orin NX 16GB (Ampere GPU, 25 W mode)",
        ),
        DeviceProfile(
            name="jetson-agx-orin-64gb",
            # NVIDIA Jetson AGX Orin Series technical brief / datasheet: 64GB 256-bit LPDDR5,
            # 204.8 GB/s; 2048 CUDA / 64 tensor cores (16 SMs) at 1.3 GHz; 5.3 FP32 TFLOPS;
            # 170 sparse INT8 TOPS (GPU); 15-60 W. FP16 dense = 16 * 2048 * 1.3 GHz = 42.6 TFLOPS.
            memory_bytes=_usable(64, 0.75),
            peak_flops=16 * 2048 * 1.3e9,
            mem_bandwidth_bytes_per_s=204.8e9,
            power_watts=60.0,
            description="NVIDIA Jetson AGX Orin 64GB (Ampere GPU, MAXN 60 W)",
        ),
        DeviceProfile(
            name="raspberry-pi-5-8gb",
            # Raspberry Pi 5 product brief: BCM2712, 4x Cortex-A76 at 2.4 GHz, LPDDR4X-4267
            # (32-bit bus: 4267 MT/s * 4 B = 17.1 GB/s). Cortex-A76 has two 128-bit NEON FMA
            # pipes: 8 FP16 lanes * 2 pipes * 2 FLOP = 32 FLOP/clk/core -> 4 * 2.4 GHz * 32 =
            # 307 GFLOPS FP16. Power: the brief specifies a 5 V / 5 A supply; ~8 W at full CPU
            # load is an estimate from public measurements, not a spec-sheet figure.
            memory_bytes=_usable(8, 0.75),
            peak_flops=4 * 2.4e9 * 32,
            mem_bandwidth_bytes_per_s=4267e6 * 4,
            power_watts=8.0,
            description="Raspberry Pi 5 8GB (4x Cortex-A76 CPU, NEON FP16)",
        ),
        DeviceProfile(
            name="apple-a17-pro",
            # iPhone 15 Pro (Apple A17 Pro). Apple publishes no FLOPS or bandwidth figures:
            # 8GB LPDDR5-6400 on a 64-bit bus (teardowns) -> 51.2 GB/s; 6-core GPU ~2.15 TFLOPS
            # FP32 at the same FP16 rate (third-party figures: 768 ALUs * 2 * ~1.4 GHz). Apps may
            # use ~50% of RAM; ~6 W sustained SoC power is an estimate, not a spec-sheet figure.
            memory_bytes=_usable(8, 0.5),
            peak_flops=2.15e12,
            mem_bandwidth_bytes_per_s=51.2e9,
            power_watts=6.0,
            description="Apple A17 Pro phone SoC (iPhone 15 Pro, GPU)",
        ),
        DeviceProfile(
            name="ryzen-7-7840u",
            # AMD Ryzen 7 7840U product page: 8 Zen 4 cores, 3.3 GHz base (5.1 boost), 28 W default
            # TDP (15-30 W), LPDDR5x-7500 (128-bit: 7500 MT/s * 16 B = 120 GB/s). Zen 4 runs
            # AVX-512 on two 256-bit FMA pipes: 16 FP32 FMA = 32 FLOP/clk/core -> 8 * 3.3 GHz * 32
            # = 845 GFLOPS FP32 at base clock. Laptop with 16 GB; 75% usable.
            memory_bytes=_usable(16, 0.75),
            peak_flops=8 * 3.3e9 * 32,
            mem_bandwidth_bytes_per_s=120e9,
            power_watts=28.0,
            flops_precision="fp32",
            description="AMD Ryzen 7 7840U laptop CPU (8x Zen 4, AVX-512)",
        ),
        DeviceProfile(
            name="rtx-4090",
            # NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): 24 GB GDDR6X, 1008 GB/s;
            # peak FP16 tensor TFLOPS with FP32 accumulate 165.2 dense (330.4 sparse); 450 W TGP.
            # ~1.5 GiB kept for the CUDA context and display.
            memory_bytes=int(22.5 * GiB),
            peak_flops=165.2e12,
            mem_bandwidth_bytes_per_s=1008e9,
            power_watts=450.0,
            description="NVIDIA GeForce RTX 4090 24GB (Ada)",
        ),
    )
}


def get_device(name: str) -> DeviceProfile:
    """The catalog profile `name`; raises KeyError listing the known names."""
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(
            f"unknown device {name!r}; known devices: {', '.join(sorted(CATALOG))}"
        ) from None


def local_device(name: str = "local", *, power_watts: float = 1.0) -> DeviceProfile:
    """A rough profile of this machine: measured float32 matmul rate and copy bandwidth, and the
    default device's memory limit (or the host's available RAM). `power_watts` is not measured."""
    from floe_jax.cost_table import local_memory_bytes, measure_bandwidth_and_flops

    flops, bw = measure_bandwidth_and_flops()
    return DeviceProfile(
        name=name,
        memory_bytes=local_memory_bytes(),
        peak_flops=flops,
        mem_bandwidth_bytes_per_s=bw,
        power_watts=power_watts,
        flops_precision="fp32 (measured)",
        description="this machine, measured",
    )
