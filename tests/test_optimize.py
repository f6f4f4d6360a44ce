"""ZImage.optimize() (regional torch.compile of the transformer blocks) and the CLI's --compile default."""

import torch

from zimage_core import compile as compile_mod
from zimage_core.cli import build_parser


def test_optimize_traces_every_block_without_graph_breaks_and_changes_nothing(tiny_pipe):
    """Dynamo traces each block whole (fullgraph=True raises on a graph break); the eager backend runs the captured
    graph without code generation, so the images must be bit-identical to eager. Then back to eager."""
    kw = dict(width=64, height=64, steps=2, seed=5, cfg_scale=2.0)
    want = tiny_pipe.generate("a red circle", **kw).latents
    torch._dynamo.reset()
    try:
        tiny_pipe.optimize(backend="eager", fullgraph=True)
        assert compile_mod.is_compiled(tiny_pipe.transformer)
        n_blocks = len(compile_mod.repeated_blocks(tiny_pipe.transformer))
        cfg = tiny_pipe.transformer.config
        assert n_blocks == cfg.n_layers + 2 * cfg.n_refiner_layers  # main + noise refiner + context refiner blocks
        got = tiny_pipe.generate("a red circle", **kw).latents
    finally:
        tiny_pipe.optimize(False)
    assert not compile_mod.is_compiled(tiny_pipe.transformer)
    assert torch.equal(got, want)


def test_compile_default_is_on_for_cuda_only_and_can_be_turned_off(monkeypatch):
    monkeypatch.delenv(compile_mod.ENV, raising=False)
    assert compile_mod.default_enabled(torch.device("cuda")) and not compile_mod.default_enabled(torch.device("cpu"))
    monkeypatch.setenv(compile_mod.ENV, "0")
    assert not compile_mod.default_enabled(torch.device("cuda"))
    p = build_parser()
    assert p.parse_args(["generate", "x"]).compile is None  # None: the device decides
    assert p.parse_args(["generate", "x", "--no-compile"]).compile is False
    assert p.parse_args(["generate", "x", "--compile"]).compile is True
