from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kernels_package_is_ours():
    """Hugging Face publishes an unrelated package imported as `kernels`; the one we import must be this repo's."""
    import kernels

    assert Path(kernels.__file__).resolve().is_relative_to(REPO), kernels.__file__
    assert hasattr(kernels, "get_ops") and hasattr(kernels.reference, "attention")


def test_top_level_layout():
    top = ("pyproject.toml", "CMakeLists.txt", "README.md", ".ci/run", "kernels", "zimage_core", "bench", "tests")
    for name in top:
        assert (REPO / name).exists(), name


def test_lock_file_pins_cpu_torch_and_diffusers():
    lock = (REPO / "requirements" / "lock-cpu.txt").read_text().splitlines()
    assert "torch==2.13.0+cpu" in lock
    assert "diffusers==0.42.1" in lock
