"""The wheels the GPU check carries to the device machine: the packages the GPU path needs that it lacks.

    python benchmarks/gpu_wheels.py            # download into benchmarks/wheels/, list the sizes, check the limit
    python benchmarks/gpu_wheels.py --check    # the same from what is already there, without pip

The device machine (nvidia-h200: Python 3.12, no network) has torch, transformers, peft, accelerate, safetensors,
tokenizers, pandas, pyarrow, pyyaml, tqdm, psutil, scikit-learn, huggingface-hub and the rest of WHAT_IT_HAS.
The GPU path (train, merge and its fidelity figures, evaluate: benchmarks/gpu_check.py) also imports:

  bitsandbytes  4-bit loading, the merge's NF4 rebuild, paged 8-bit AdamW
  trl           SFTTrainer, which owns train's loop
  datasets      train hands the split to SFTTrainer as a Dataset; trl imports it everywhere
  pydantic      tuneline.params: every stage validates its params.yaml section

with the needs of these that the device lacks. Left behind on purpose: dvc, dvclive (train logs its loss curve to
a dvclive Live, but dvclive drags in dvc and ~40 packages; gpu_check.py puts a no-op stand-in on the path), prefect
and fastapi (orchestration), gguf (the export stage only), lm_eval (evaluate.lm_eval is off by default).

Each wheel is the pyproject.toml pin (for a package it names) or the version this project's venv installs beside
those pins; pip downloads them for CPython 3.12 on manylinux x86-64 with --no-deps, and a wheel of another version
left in the folder is deleted (two versions of one package stop the whole install there). requirements.txt beside
the wheels lists the pins for `pip install --no-index --find-links` (the command is in gpu_check.py's docstring).

Everything that travels must fit in 64 MiB: the working tree (tracked and untracked-not-ignored files), the wheels
and the carried data set. The script fails in one line when it does not.
"""

import argparse
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
WHEELS_DIR = PROJECT / "benchmarks" / "wheels"
DATASET_DIR = PROJECT / "data" / "dataset"
LIMIT_BYTES = 64 * 2**20  # what one device call may carry: working tree + carried paths
MiB = 2**20

# Package -> why the GPU path needs it. A version comes from pyproject.toml when the package is pinned there.
NEEDED = {
    "bitsandbytes": "4-bit base (train, merge, evaluate), NF4 rebuild (merge), paged 8-bit AdamW",
    "trl": "SFTTrainer (train)",
    "datasets": "train's Dataset.from_pandas; imported by trl",
    "pydantic": "tuneline.params (every stage)",
}
# Their own needs that the device lacks (or may hold too old), at the versions this project's venv installs beside
# the pins above (pip list of .venv, 2026-12).
TRANSITIVE = {
    "pydantic-core": ("2.50.5", "pydantic (pinned exactly by it)"),
    "annotated-types": ("0.8.0", "pydantic"),
    "typing-inspection": ("0.4.5", "pydantic"),
    "typing-extensions": ("4.16.0", "pydantic needs >= 4.16.0; the device's version is not recorded"),
    "dill": ("0.4.1", "datasets"),
    "multiprocess": ("0.70.19", "datasets"),
}
# What the device's image holds, of the names the carried wheels require (/work/.library/device/KINDS.md, "Python
# packages already there", read on 2026-11-17). Versions there are only partly recorded: gpu_check.py checks them.
WHAT_IT_HAS = {
    "accelerate", "filelock", "fsspec", "httpx", "huggingface-hub", "jinja2", "numpy", "packaging", "pandas",
    "psutil", "pyarrow", "pyyaml", "requests", "safetensors", "tokenizers", "torch", "tqdm", "transformers",
    "xxhash",
}
# Where pip may find a binary wheel for the device (the device README's list; pip matches each tag exactly).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# What a device call carries besides the wheels: the default data set (train.parquet, eval.parquet, tokenizer/).
CARRIED_DATA = (DATASET_DIR,)


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def pyproject_pins() -> dict[str, str]:
    """Package -> version, for every `name==version` of pyproject.toml's dependencies."""
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in project["dependencies"]:
        name, _, version = requirement.partition("==")
        pins[canonical(name.strip())] = version.strip()
    return pins


def wanted() -> dict[str, tuple[str, str]]:
    """Package -> (version, why): what the device gets as wheels."""
    pins = pyproject_pins()
    return {**{name: (pins[name], why) for name, why in NEEDED.items()}, **TRANSITIVE}


def wheel_name(path: Path) -> tuple[str, str]:
    """(package, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return canonical(name), version


def download(dest: Path, packages: dict[str, tuple[str, str]]) -> None:
    """Fetch each pinned wheel for the device into `dest`, deleting any other version of a wanted package first."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in dest.glob("*.whl"):
        name, version = wheel_name(path)
        if name not in packages or packages[name][0] != version:
            path.unlink()
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
         "3.12", "--implementation", "cp", *platforms, "--dest", str(dest),
         *(f"{name}=={version}" for name, (version, _) in packages.items())],
        check=True,
    )
    (dest / "requirements.txt").write_text(
        "# The GPU check's wheels (benchmarks/gpu_wheels.py): install with --no-index --find-links --no-deps\n"
        + "".join(f"{name}=={version}\n" for name, (version, _) in sorted(packages.items())))


def requirements_not_met(wheels: list[Path], carried: set[str]) -> list[str]:
    """`wheel: requirement` for every requirement (for CPython 3.12 on Linux, no extras) that neither another carried
    wheel nor the device's image provides."""
    from packaging.requirements import Requirement

    environment = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                   "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    missing = []
    for wheel in wheels:
        for text in _requires(wheel):
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate(environment):
                continue
            if canonical(requirement.name) not in carried | WHAT_IT_HAS:
                missing.append(f"{wheel.name}: {text}")
    return missing


def _requires(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA, read in place (a wheel is a zip file)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        return Parser().parsestr(archive.read(name).decode()).get_all("Requires-Dist") or []


def working_tree_bytes(carried: list[Path]) -> int:
    """What a device call sends besides `carry`: tracked files that exist and untracked files git does not ignore,
    but for those under the `carried` folders (counted with them)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=PROJECT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    files = [PROJECT / name for name in set(listed) if name]
    return sum(file.stat().st_size for file in files
               if file.is_file() and not any(file.is_relative_to(folder) for folder in carried))


def tree_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def is_ignored(path: Path) -> bool:
    """Whether git ignores `path` (only ignored paths may be named in `carry`)."""
    return subprocess.run(["git", "check-ignore", "-q", str(path.relative_to(PROJECT))], cwd=PROJECT).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", type=Path, default=WHEELS_DIR, help="where the wheels go (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="no download: sizes and limit of what is there")
    args = parser.parse_args()
    packages = wanted()
    if not args.check:
        download(args.dest, packages)
    wheels = sorted(args.dest.glob("*.whl"))
    found = dict(map(wheel_name, wheels))
    absent = [f"{name}=={version}" for name, (version, _) in packages.items() if found.get(name) != version]
    if absent:
        sys.exit(f"gpu_wheels: {args.dest} lacks {', '.join(absent)}; run without --check to download them")

    width = max(len(wheel.name) for wheel in wheels)
    print(f"{'wheel':<{width}}  {'MiB':>6}  why")
    for wheel in wheels:
        print(f"{wheel.name:<{width}}  {wheel.stat().st_size / MiB:6.2f}  {packages[wheel_name(wheel)[0]][1]}")
    for problem in requirements_not_met(wheels, set(found)):
        print(f"needs what neither the wheels nor the device's image has: {problem}")

    parts = {"wheels": sum(wheel.stat().st_size for wheel in wheels),
             "working tree": working_tree_bytes([args.dest.resolve(), *CARRIED_DATA])}
    for path in CARRIED_DATA:
        if not path.is_dir():
            sys.exit(f"gpu_wheels: {path.relative_to(PROJECT)} is missing; build it (dvc repro dataset) before "
                     "sizing what travels")
        parts[str(path.relative_to(PROJECT))] = tree_bytes(path)
    total = sum(parts.values())
    sizes = " + ".join(f"{name} {size / MiB:.1f}" for name, size in parts.items())
    for path in (args.dest, *CARRIED_DATA):
        if path.is_relative_to(PROJECT) and not is_ignored(path):
            print(f"note: git does not ignore {path.relative_to(PROJECT)}/: it travels as untracked files, and "
                  f"`carry` cannot name it; add /{path.relative_to(PROJECT)}/ to .gitignore")
    if total > LIMIT_BYTES:
        sys.exit(f"gpu_wheels: {sizes} = {total / MiB:.1f} MiB would travel, over the {LIMIT_BYTES / MiB:.0f} MiB "
                 "a device call takes")
    print(f"travels: {sizes} = {total / MiB:.1f} MiB of {LIMIT_BYTES / MiB:.0f} MiB "
          f"({(LIMIT_BYTES - total) / MiB:.1f} MiB spare)")


if __name__ == "__main__":
    main()
