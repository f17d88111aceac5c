"""The bandwidth probe and the roof it gives decode."""
import pytest

from llmopt.bench import bandwidth
from llmopt.bench.environment import environment
from llmopt.engine import cpu_kernels
from llmopt.hardware import isa_level


def test_probe_reads_with_every_method_and_keeps_the_best():
    probe = bandwidth.read_bandwidth(8 * 2**20, repeats=2)
    assert probe.best_bytes_per_s == max(probe.by_method.values()) > 0
    assert probe.median_bytes_per_s <= probe.best_bytes_per_s
    assert ("llmopt gemv (the decode kernel)" in probe.by_method) == cpu_kernels.available()


def test_roof_is_raised_to_what_decode_proves_and_never_exceeded():
    roof, source = bandwidth.roof(10e9, [1e9, 2e9], [5.0, 7.0])  # 5 GB/s and 14 GB/s implied
    assert roof == pytest.approx(14e9) and "raised" in source
    assert all(b * t / roof <= 1 for b, t in [(1e9, 5.0), (2e9, 7.0)])
    assert bandwidth.roof(20e9, [1e9], [5.0]) == (20e9, "probe")


def test_isa_levels_by_flags_and_in_the_environment():
    assert isa_level(frozenset({"avx2", "fma"})) == "AVX2 + FMA"
    avx512 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}
    assert isa_level(frozenset(avx512)) == "AVX-512 (F/BW/VL/VNNI/BF16)"
    assert isa_level(frozenset(avx512 | {"amx_tile", "amx_bf16", "amx_int8"})).startswith("AMX")
    env = environment()
    assert {"cpu_isa", "cpu_l3_MiB", "torch_cpu_capability", "cpu_kernels", "cpu_count"} <= env.keys()
