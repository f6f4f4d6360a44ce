"""The kernel benchmark harness: work formulas, row schema, refcheck gate, CLI (CPU); a full small run (interpret)."""

import json

import pytest
import torch

from zimage_bench import kernels as bk


def test_attention_flops_formula():
    # The target shape: 4·B·H·N²·D with B=1, N=4608, H=30, D=128 (≈ 326 GFLOP).
    assert bk.attention_flops(1, 30, 4608, 4608, 128) == 4 * 30 * 4608 * 4608 * 128
    assert abs(bk.attention_flops(1, 30, 4608, 4608, 128) - 326.2e9) < 0.1e9
    # Ragged batch: only valid keys count; lengths clamp to [0, N_kv] like the kernel.
    assert bk.attention_flops(2, 2, 10, 10, 8, kv_lens=[10, 4]) == 4 * 2 * 8 * 10 * 14
    assert bk.attention_flops(2, 2, 10, 10, 8, kv_lens=[99, -1]) == 4 * 2 * 8 * 10 * 10


def test_byte_formulas_count_each_tensor_once():
    e = 2  # bf16
    s = dict(B=2, N=5, C=8)
    act, row = 2 * 5 * 8, 2 * 8
    assert bk.op_bytes("rms_norm_modulate", s, e) == (act + 8 + row + act) * e  # x, w, scale in; out
    assert bk.op_bytes("gated_residual", s, e) == (2 * act + 8 + row + act) * e  # x, y, w, gate in; out
    assert bk.op_bytes("layer_norm_modulate", s, e) == (act + row + act) * e
    assert bk.op_bytes("swiglu", dict(R=3, F=4), e) == 3 * 12 * e
    qk = dict(B=1, N=2, H=3, D=4)
    assert bk.op_bytes("qk_norm_rope", qk, e) == 4 * 24 * e + 2 * 4 * e + 2 * 2 * 8
    with pytest.raises(ValueError):
        bk.op_bytes("attention", qk, e)


def test_row_schema_is_fixed_and_serialisable():
    row = bk.make_row(op="swiglu", case="c", provider="eager", median_ms=1.0, gbps=2.0, env={"device": "cpu"})
    assert tuple(row) == bk.ROW_KEYS
    json.dumps(row)
    with pytest.raises(KeyError):
        bk.make_row(op="x", bogus=1)


def test_cases_cover_every_op_and_the_target_shape():
    for which in ("zimage", "small"):
        assert {c.op for c in bk.cases(which)} == set(bk.OPS)
    target = [c for c in bk.cases("zimage") if c.op == "attention" and c.shape["kv_lens"] is None]
    assert any(c.shape == dict(B=1, N=4608, H=30, D=128, kv_lens=None) for c in target)
    for c in bk.cases("small"):
        (args, kwargs) = c.inputs("cpu", torch.float32)
        assert all(torch.isfinite(a).all() for a in args if isinstance(a, torch.Tensor) and not a.is_complex())


def test_failed_refcheck_is_not_timed(monkeypatch):
    """A provider whose result breaks the tolerance rule gets a FAIL row without timings, and main's exit is 1."""
    case = bk.Case("swiglu", "t", dict(R=4, F=64))

    def crashes(a, b):
        raise ValueError("boom")

    provs = {"eager": bk.reference.swiglu, "broken": lambda a, b: bk.reference.swiglu(a, b) * 1.01, "crash": crashes}
    ns = bk.parse_args(["--cases", "small", "--quick"])
    rows = bk.run_case(case, torch.device("cpu"), torch.float32, provs, {"device": "cpu"}, None, ns)
    good, bad, crash = rows
    assert good["refcheck"]["passed"] and good["median_ms"] > 0 and good["gbps"] > 0
    assert not bad["refcheck"]["passed"] and bad["median_ms"] is None and "FAILED" in bad["note"]
    assert not crash["refcheck"]["passed"] and "boom" in crash["note"] and crash["median_ms"] is None


def test_torch_only_run_writes_jsonl(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    code = bk.main(["--ops", "swiglu", "layer_norm_modulate", "--providers", "eager", "--quick", "--out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["op"] == "copy" and rows[0]["gbps"] > 0
    assert sorted(r["op"] for r in rows[1:]) == ["layer_norm_modulate", "swiglu"]
    for r in rows[1:]:
        assert r["device"] == "cpu" and r["refcheck"]["passed"] and r["gbps"] > 0 and r["env"]["torch"]
        assert r["pct_of_copy"] is None  # no roofline claim on CPU
    assert "swiglu" in capsys.readouterr().out


@pytest.mark.interpret
def test_small_run_checks_triton_under_the_interpreter(tmp_path):
    out = tmp_path / "rows.jsonl"
    assert bk.main(["--ops", "attention", "rms_norm_modulate", "--cases", "small", "--quick", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    triton_rows = [r for r in rows if r["provider"] == "triton"]
    assert {r["op"] for r in triton_rows} == {"attention", "rms_norm_modulate"}
    for r in triton_rows:  # checked, never timed on CPU
        assert r["refcheck"]["passed"] and r["median_ms"] is None and "interpreter" in r["note"]
