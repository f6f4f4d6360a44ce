from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kernels_package_is_ours():
    """Our kernels import as `zimage_kernels` (Hugging Face's hub-kernels library owns the name `kernels`)."""
    import zimage_kernels

    assert Path(zimage_kernels.__file__).resolve().is_relative_to(REPO), zimage_kernels.__file__
    assert hasattr(zimage_kernels, "get_ops") and hasattr(zimage_kernels.reference, "attention")


def test_top_level_layout():
    top = (
        "pyproject.toml",
        "CMakeLists.txt",
        "README.md",
        ".ci/run",
        "zimage_kernels",
        "zimage_core",
        "zimage_bench",
        "tests",
    )
    for name in top:
        assert (REPO / name).exists(), name


def test_lock_file_pins_cpu_torch_and_diffusers():
    lock = (REPO / "requirements" / "lock-cpu.txt").read_text().splitlines()
    assert "torch==2.13.0+cpu" in lock
    assert "diffusers==0.42.1" in lock
