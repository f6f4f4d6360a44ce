"""``python -m zimage_bench ablate`` runs every row it promises on CPU (smoke: the eager compile backend, tiny size)."""

import json

from zimage_bench import ablate


def test_ablate_rows_and_labels(tmp_path, capsys):
    out = tmp_path / "ablate.jsonl"
    args = ["--steps", "2", "--size", "64", "--repeats", "1", "--compile-backend", "eager", "--out", str(out)]
    assert ablate.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == ["all on", "- compile"]  # triton / TMA need CUDA
    assert rows[0]["on"] == ["compile"] and rows[1]["on"] == []
    assert all(r["ms_per_step"] > 0 and len(r["runs_s"]) == 1 for r in rows)
    assert rows[0]["ratio_to_all_on"] == 1.0
    text = capsys.readouterr().out
    assert "CPU ratios, not GPU figures" in text and "triton: not measured here (needs CUDA)" in text
