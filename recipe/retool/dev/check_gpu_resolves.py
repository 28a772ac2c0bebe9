"""Resolve each GPU dependency set for Python 3.12 / manylinux x86_64, without installing it.

    python recipe/retool/dev/check_gpu_resolves.py [--set gpu|gpu-vllm ...] [--report-dir DIR] [--pip PIP]

For every set (pyproject.toml's ``gpu`` extra, SGLang; its ``gpu-vllm`` extra, vLLM; the Modal image
installs the same extras) this asks pip to resolve ``<repo>[extra]`` exactly as
``pip install -e ".[extra]"`` would on a GPU image, but for a target
platform (``--dry-run --ignore-installed --only-binary=:all: --python-version 3.12 --platform
manylinux_2_{17..35}_x86_64 … --report``), so it runs on any CPU machine. Then it checks that every
``==`` pin of the set is what pip chose, and prints the versions that matter.

``--only-binary=:all:`` (which pip requires for a foreign platform) cannot use packages published
only as source; hydra-core 1.3 needs one of them (antlr4-python3-runtime 4.9.3, pure Python), and
without it pip silently backtracks to hydra-core 0.11. So that package is built into a local wheel
first and offered with ``--find-links``, and the check fails if hydra-core < 1.3 is chosen anyway.

Exit codes: 0 every set resolves; 1 a set does not resolve or a pin is not honoured; 2 the package
registry could not be reached (nothing was decided). pip downloads each wheel it considers, so the
first run fetches a few GB (pip's cache makes later runs quick). ``--report-dir`` keeps pip's JSON
reports (``<set>.json``), from which ``scripts/lab/gpu_engine_wheels.py`` stages wheels for a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from recipe.retool import REPO_ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli
    import tomli as tomllib

REPO = REPO_ROOT
PYPROJECT = REPO / "pyproject.toml"
SETS = ("gpu", "gpu-vllm")  # pyproject.toml's GPU extras
PYTHON_VERSION = "3.12"
# glibc 2.17 … 2.35 (Ubuntu 22.04, the Modal image's base); SGLang's own wheels are manylinux_2_34
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(35, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64", "any"]
SDIST_ONLY = ["antlr4-python3-runtime==4.9.3"]  # hydra-core 1.3's pin; pure Python, published as source only
FLOORS = {"hydra-core": (1, 3), "omegaconf": (2, 3)}  # below these pip went back to releases verl cannot use
SHOW = ["verl", "sglang", "sglang-kernel", "flashinfer-python", "vllm", "transformers", "tokenizers", "torch",
        "triton", "ray", "tensordict", "hydra-core"]
OFFLINE = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|"
                     r"Could not fetch URL|ConnectTimeoutError|Network is unreachable|ProxyError")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(extra: str, pyproject: Path = PYPROJECT) -> list[str]:
    """The requirements of one of pyproject.toml's extras, as declared there (what pip resolves)."""
    return list(tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"][extra])


def pins(extra: str, pyproject: Path = PYPROJECT) -> dict[str, str]:
    """The ``==`` pins of an extra: each must be what pip chooses."""
    out = {}
    for line in requirements(extra, pyproject):
        line = line.split(";", 1)[0].strip()
        if m := re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)", line):
            out[normalize(m.group(1))] = m.group(2)
    return out


def platform_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def build_wheelhouse(pip: list[str], dest: Path) -> tuple[int, str]:
    proc = subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(dest), *SDIST_ONLY],
                          capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def resolve(pip: list[str], extra: str, wheelhouse: Path, report: Path) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as target:  # --target: pip's condition for foreign-platform options
        cmd = [*pip, "install", "--dry-run", "--ignore-installed", "--target", target, "--disable-pip-version-check",
               *platform_args(), "--find-links", str(wheelhouse), "--report", str(report), f"{REPO}[{extra}]"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def check_report(report: Path, extra: str) -> tuple[dict[str, str], list[str]]:
    chosen = {normalize(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    problems = [f"{name}=={want} pinned, pip chose {chosen.get(name)}" for name, want in pins(extra).items()
                if chosen.get(name) != want]
    for name, floor in FLOORS.items():
        version = chosen.get(name)
        if version and tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < floor:
            problems.append(f"{name} {version} chosen (< {'.'.join(map(str, floor))}): pip backtracked to an unusable release")
    return chosen, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe.retool.dev.check_gpu_resolves", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="sets", action="append", choices=SETS, help="default: every set")
    p.add_argument("--report-dir", type=Path, help="keep pip's JSON report of each set here")
    p.add_argument("--pip", default=f"{sys.executable} -m pip", help="pip command (default: this Python's)")
    args = p.parse_args(argv)
    pip = args.pip.split()
    failed = offline = False
    with tempfile.TemporaryDirectory() as tmp:
        wheelhouse = Path(tmp) / "wheelhouse"
        rc, out = build_wheelhouse(pip, wheelhouse)
        if rc != 0:
            print(out)
            return 2 if OFFLINE.search(out) else 1
        report_dir = args.report_dir or Path(tmp)
        report_dir.mkdir(parents=True, exist_ok=True)
        for name in args.sets or list(SETS):
            report = report_dir / f"{name}.json"
            rc, out = resolve(pip, name, wheelhouse, report)
            if rc != 0:
                kind = "UNREACHABLE" if OFFLINE.search(out) else "DOES NOT RESOLVE"
                offline |= kind == "UNREACHABLE"
                failed |= kind != "UNREACHABLE"
                print(f"[{name}] {kind}: pyproject.toml's [{name}] extra\n" + "\n".join(out.splitlines()[-25:]))
                continue
            chosen, problems = check_report(report, name)
            failed |= bool(problems)
            status = "ok" if not problems else "PIN NOT HONOURED: " + "; ".join(problems)
            shown = " ".join(f"{k}=={chosen[k]}" for k in SHOW if k in chosen)
            print(f"[{name}] {status}: {len(chosen)} packages for Python {PYTHON_VERSION} manylinux x86_64; {shown}")
    return 1 if failed else 2 if offline else 0


if __name__ == "__main__":
    sys.exit(main())
