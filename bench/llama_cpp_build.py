"""How long `pip install -r requirements-gguf.txt` takes: the first time, pip downloads llama-cpp-python's source and
compiles llama.cpp; after that, pip's wheel cache has the wheel.

    python bench/llama_cpp_build.py      # bench/results/llama-cpp-build-cpu.json and .md

Both installs take requirements-gguf.txt as written (its build options included), each into a folder of its own
(`pip install --target`) with one pip cache, empty before the first: the first install is what a cold CI run or a
user's first install does, the second what every later one does. Each records wall and CPU seconds (the children's
user + sys) and the load average before and after, since other work on the machine stretches the wall time. Then the
installed bindings are imported, and the libraries the wheel ships are listed.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
RESULTS = REPO_ROOT / "bench" / "results"

from bench.train_throughput import machine, write_results  # noqa: E402
from lora_recipes.gguf import LLAMA_CPP_PYTHON  # noqa: E402


def requirement_line() -> str:
    """The llama-cpp-python line of requirements-gguf.txt, build options included."""
    for line in (REPO_ROOT / "requirements-gguf.txt").read_text().splitlines():
        if line.split()[:1] == [LLAMA_CPP_PYTHON]:
            return line
    raise SystemExit(f"requirements-gguf.txt has no {LLAMA_CPP_PYTHON} line")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_install(requirements: Path, cache: Path, target: Path) -> dict:
    load_before, cpu_before, start = os.getloadavg()[0], children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--cache-dir", str(cache),
                           "--target", str(target), "-r", str(requirements)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the install failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"wall_s": time.perf_counter() - start, "cpu_s": children_cpu_seconds() - cpu_before,
            "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
            "built": "Building wheel for llama-cpp-python" in proc.stdout}


def bindings(target: Path) -> dict:
    """Import the installed bindings in a fresh interpreter; the shared libraries the wheel put beside them."""
    code = "import llama_cpp, json; print(json.dumps(llama_cpp.__version__))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(target)})
    if proc.returncode != 0:
        raise SystemExit(f"import llama_cpp failed: {proc.stderr[-2000:]}")
    return {"version": json.loads(proc.stdout.strip().splitlines()[-1]),
            "libraries": sorted(p.name for p in (target / "llama_cpp" / "lib").glob("*.so*"))}


def markdown(results: dict) -> str:
    m, first, cached = results["machine"], results["installs"]["first"], results["installs"]["cached"]
    rows = [f"| {name} | {r['wall_s']:.1f} s | {r['cpu_s']:.1f} s | {r['load_average_before']:.1f} → "
            f"{r['load_average_after']:.1f} | {'yes' if r['built'] else 'no'} |"
            for name, r in (("first (download + compile)", first), ("cached (pip's wheel cache)", cached))]
    return "\n".join([
        "# Installing llama.cpp's runtime (requirements-gguf.txt)", "",
        f"`{results['command']}` on {m['cpu']} ({m['cpu_cores']} cores), Python {m['python']}.",
        f"Requirement: `{results['requirement']}`; wheel {results['wheel_bytes'] / 2**20:.1f} MiB, "
        f"shipping {', '.join(results['bindings']['libraries'])}.", "",
        "| install | wall | CPU (user + sys) | load average before → after | compiled |",
        "|---|---|---|---|---|", *rows, ""])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(RESULTS / "llama-cpp-build-cpu.json"))
    parser.add_argument("--keep_wheel", help="copy the built wheel into this folder (to install it elsewhere)")
    args = parser.parse_args(argv)
    results = {"command": "python bench/llama_cpp_build.py", "machine": machine("cpu"),
               "requirement": requirement_line()}
    with tempfile.TemporaryDirectory(prefix="llama-cpp-build-") as tmp:
        tmp = Path(tmp)
        installs = {}
        for name in ("first", "cached"):
            installs[name] = timed_install(REPO_ROOT / "requirements-gguf.txt", tmp / "pip-cache", tmp / name)
            print(f"{name}: {installs[name]}", flush=True)
        wheel = next((tmp / "pip-cache" / "wheels").rglob("llama_cpp_python-*.whl"))
        if args.keep_wheel:
            Path(args.keep_wheel).mkdir(parents=True, exist_ok=True)
            shutil.copy(wheel, args.keep_wheel)
        if not installs["first"]["built"] or installs["cached"]["built"]:
            raise SystemExit(f"expected one compile, then the cached wheel: {installs}")
        results["installs"] = installs
        results["bindings"] = bindings(tmp / "cached")
        results["wheel_bytes"] = wheel.stat().st_size
    write_results(Path(args.output), results, markdown(results))


if __name__ == "__main__":
    main()
