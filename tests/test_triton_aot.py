"""The ahead-of-time compile check of the Triton kernels (udat_kernels/triton_backend/aot.py;
docs/design.md, "The Triton kernels"): its pieces, on the CPU.

The compile itself runs in `make triton-aot` after the test run, over the launches that run
recorded; here: the recorded specialization is the one Triton's runtime makes, the occupancy
arithmetic, the SASS reading, the failure rules, and the design occupancy covering every kernel.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from udat_kernels.triton_backend import _runtime, aot, plan, small_c, tiled  # noqa: E402


def test_blocks_per_sm():
    # 255 registers × 256 threads: 65280 of 65536 registers, one block
    assert aot.blocks_per_sm(255, 8, 0) == 1
    # 128 registers × 128 threads = 16384: four blocks
    assert aot.blocks_per_sm(128, 4, 0) == 4
    # registers are allocated per warp in units of 256: 33 registers count as 40
    assert aot.blocks_per_sm(33, 4, 0) == 12
    # threads: at most 2048 per SM
    assert aot.blocks_per_sm(16, 4, 0) == 16
    # shared memory: 100 KB (+ 1 KB reserved) twice in 228 KB
    assert aot.blocks_per_sm(32, 4, 100 * 1024) == 2
    # at most 32 blocks
    assert aot.blocks_per_sm(16, 1, 0) == 32


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], R24 ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0050*/                   MEMBAR.ALL.CTA ;
        /*0060*/              @!P1 BRA 0x10 ;
        /*0070*/                   STL [R1], R5 ;
        /*0080*/                   HMMA.1684.F32.TF32 R4, R8, R12, R4 ;
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA 0xa0;
"""


def test_analyze_sass():
    r = aot.analyze_sass(SASS)
    assert r["loops"] == [{"length": 6, "barriers": 1, "async_loads": 2, "mma": 1,
                           "innermost": True}]
    assert r["tf32_mma"] == 1
    assert r["local_stores"] == 1


def _spec(kernel="udat_kernels.triton_backend.tiled:_logits_kernel", origins=("tests",)):
    return {"kernel": kernel, "args": [["x_ptr", "*bf16", "D"]], "constexprs": {"BLOCK_M": 64},
            "num_warps": 4, "num_stages": 3, "origins": list(origins)}


def _result(**kw):
    r = {"regs": 128, "stack": 0, "local": 0, "shared": 0, "blocks_per_sm": 2, "spill_bytes": 0,
         "tf32_mma": 0, "loops": [], "seconds": 0.1}
    r.update(kw)
    return r


@pytest.mark.parametrize("result,origins,expected", [
    (_result(), ("tests",), None),
    (_result(spill_bytes=8), ("tests",), "spills"),
    (_result(tf32_mma=2), ("tests",), "TF32"),
    (_result(blocks_per_sm=1), ("paper (64, 1024, 2) bf16",), "designed for 2"),
    (_result(blocks_per_sm=1), ("tests",), None),  # the tests' tiles are not the design's
    ({"error": "CompilationError: x"}, ("tests",), "does not compile"),
])
def test_check_rules(result, origins, expected):
    fails = aot.check({"k": _spec(origins=origins)}, {"k": result}, {"logits_kernel": 2})
    if expected is None:
        assert fails == []
    else:
        assert len(fails) == 1 and expected in fails[0]


def test_tf32_mma_read_from_the_ptx():
    # the builds the check does not disassemble are checked for TF32 on their PTX
    ptx = """
    mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1, %f2, %f3, %f4}, {%r1}, {%r2};
    @%p1 wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {%f5}, %rd1, %rd2, 1, 1, 1, 1;
    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f6}, %rd3, %rd4, 1, 1, 1, 1, 1, 1;
    fma.rn.f32 %f7, %f8, %f9, %f7;
    // tf32 in a comment is no instruction
    """
    assert aot.ptx_tf32_mma(ptx) == 2


SASS_NESTED = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FFMA R3, R2, R2, R3 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0050*/               @P1 BRA 0x10 ;
        /*0060*/                   EXIT ;
"""


def test_nested_loops_and_the_declared_barriers():
    r = aot.analyze_sass(SASS_NESTED)
    assert [(lp["length"], lp["barriers"], lp["innermost"]) for lp in r["loops"]] == [
        (3, 0, True), (5, 1, False)]
    spec = _spec("udat_kernels.triton_backend.small_c:_small_c_kernel",
                 ("bandwidth (65536, 1024, 7) bf16",))
    spec["constexprs"] = {"COMPUTE_GRAD": True}
    per_block = small_c._barriers(True)[0]
    ok = _result(loops=r["loops"])
    assert aot.check({"k": spec}, {"k": ok}, {"small_c_kernel": 2}) == []
    # a barrier in the feature loop, or more per row block than the launch declares, fails
    inner = _result(loops=[dict(r["loops"][0], barriers=1), r["loops"][1]])
    outer = _result(loops=[r["loops"][0], dict(r["loops"][1], barriers=per_block + 1)])
    for bad in (inner, outer):
        fails = aot.check({"k": spec}, {"k": bad}, {"small_c_kernel": 2})
        assert len(fails) == 1 and "barriers" in fails[0]


def test_recorded_specialization_is_the_runtimes():
    # Alignment and value specializations as Triton's runtime makes them: an aligned tensor is
    # "D", a tensor at an odd offset is not, 16 is "D", 1 becomes a constexpr; a count the
    # kernel does not specialize on (N, in _runtime.COUNTS) has no key.
    x = torch.zeros(64)
    spec = _runtime.specialization(tiled._row_norm_kernel, (x, x[1:], 1, 1, 17),
                                   dict(BLOCK_R=16, BLOCK_D=16), 4, 3)
    assert spec["args"] == [["src_ptr", "*fp32", "D"], ["norm_ptr", "*fp32", ""],
                            ["N", "i32", None], ["D", "constexpr", 1], ["stride", "i32", ""]]
    src = aot._source(spec)
    assert src.signature["D"] == "constexpr" and src.constants[(3,)] == 1
    assert src.signature["N"] == "i32" and (2,) not in src.attrs
    assert src.attrs[(0,)] == [["tt.divisibility", 16]] and src.attrs[(1,)] == []


def test_recording_the_interpreted_launches(tmp_path, monkeypatch):
    path = tmp_path / "specs.jsonl"
    monkeypatch.setenv("UDAT_TRITON_LAUNCHES", str(path))
    monkeypatch.setattr(_runtime, "_file_seen", set())
    from udat_kernels.triton_backend import launch

    x, w, t = torch.randn(1, 8), torch.randn(3, 8), torch.tensor([2])  # one block
    launch.margin_ce_fwd(x, w, t, None, None, None, None, True, 64.0, 0.5, 0.0, 0.0, -100, 1,
                         False, True)
    specs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [s["kernel"].split(":")[1] for s in specs] == ["_small_c_kernel"]
    assert specs[0]["constexprs"]["NUM_C"] == 4 and specs[0]["num_stages"] >= 1


def test_design_occupancy_covers_every_kernel():
    design = aot.DESIGN
    planned = set()
    for _, B, D, C, dtype in aot.TARGET_SHAPES:
        planned |= {aot.short(k) for k, _ in plan.plan(B, D, C, dtype).launches}
    assert planned <= set(design), planned - set(design)
    assert all(isinstance(v, int) and v >= 1 for v in design.values())


def test_target_shapes_plan_the_launchers_own_configs():
    specs = aot.target_specs()
    kernels = {aot.short(s["kernel"]) for s in specs.values()}
    assert {"small_c_kernel", "logits_kernel"} <= kernels
    assert small_c.SMALL_C_MAX >= 7
