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


def _lock(name: str) -> dict[str, str]:
    lines = (REPO / "requirements" / name).read_text().splitlines()
    pins = [line.split("==") for line in lines if "==" in line and not line.startswith("#")]
    return {n.lower().replace("_", "-"): v for n, v in pins}


def test_current_lock_pins_the_newest_set_beside_hugging_faces_kernels():
    cur = _lock("lock-current.txt")
    for name in ("torch", "triton", "diffusers", "transformers", "kernels"):
        assert name in cur, name
    assert cur["diffusers"] == _lock("lock-cpu.txt")["diffusers"]  # parity is tested against one diffusers


def test_pyproject_bounds_admit_both_tested_sets_and_no_untested_minor():
    """Every dependency bound admits the version of both locks; torch/triton/transformers end right after the
    current set (their next minor release is untested)."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    locks = {"lock-cpu.txt": _lock("lock-cpu.txt"), "lock-current.txt": _lock("lock-current.txt")}
    for req in deps:
        name = req.name.lower()
        for lock_name, pins in locks.items():
            if name in pins:
                assert req.specifier.contains(Version(pins[name]), prereleases=True), (str(req), lock_name)
    by = {r.name: r for r in deps}
    for name in ("torch", "triton", "transformers"):
        v = Version(locks["lock-current.txt"][name])
        assert not by[name].specifier.contains(f"{v.major}.{v.minor + 1}.0"), str(by[name])
        low = Version(locks["lock-cpu.txt"][name])
        assert not by[name].specifier.contains(f"{low.major}.{low.minor - 1}.0"), str(by[name])  # below the lock
