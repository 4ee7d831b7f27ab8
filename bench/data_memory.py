"""Peak memory and speed of `prepare_data` on big local files, each prepared in a process of its own.

    python bench/data_memory.py --gigabytes 2     # ~2 GB of JSON lines per schema: bench/results/data-scale-cpu.*
    python bench/data_memory.py --probe FILE --domain medical [--num_proc 2]    # one file: one JSON line

A probe reports rows read, seconds, the file's size, the resident set after the imports (`baseline_rss`), its peak
(`peak_rss`, VmHWM: every page the process held at once, memory-mapped Arrow pages included) and the peak of its
anonymous memory (`peak_anon_rss`, RssAnon sampled every 10 ms: what the kernel cannot reclaim by dropping file pages).
`tests/test_data_disk.py` and `bench/train_throughput.py` run it.
"""

import argparse
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
RESULTS = REPO_ROOT / "bench" / "results"
SAMPLES = REPO_ROOT / "data" / "samples"
# (domain, sample file, whether the rows are first converted to the messages schema): one domain schema, and chat
# rows, each lengthened to about ROW_BYTES (notes, filings and contracts run to pages: and on 2 cores shared with
# other jobs, 2 GB of half-kilobyte rows would take hours)
SCALE_SOURCES = (("medical", "medqa.jsonl", False), ("legal", "law_stackexchange.jsonl", True))
ROW_BYTES = 4096


def status_bytes(key: str) -> int:
    """A `kB` field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class AnonPeak(threading.Thread):
    """The highest RssAnon seen, sampled every 10 ms until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = status_bytes("RssAnon"), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, status_bytes("RssAnon"))
            time.sleep(0.01)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, status_bytes("RssAnon"))


def probe_here(path: Path, domain: str, num_proc: int | None) -> dict:
    """`prepare_data` on one file in this process, measured from after the imports."""
    import datasets

    from lora_recipes.data import prepare_data

    datasets.disable_progress_bars()
    schemas = importlib.import_module(f"data.{domain}").SCHEMAS
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here: the imports do not count
    baseline, baseline_anon = status_bytes("VmRSS"), status_bytes("RssAnon")
    sampler = AnonPeak()
    sampler.start()
    started = time.perf_counter()
    prepared = prepare_data([str(path)], schemas, eval_fraction=0.01, num_proc=num_proc)
    seconds = time.perf_counter() - started
    report = prepared.sources[0]
    return {"file_bytes": path.stat().st_size, "rows": report.read, "kept": report.kept, "schema": report.schema,
            "train": len(prepared.train), "num_proc": num_proc, "seconds": seconds,
            "rows_per_s": report.read / seconds, "baseline_rss": baseline, "peak_rss": status_bytes("VmHWM"),
            "baseline_anon_rss": baseline_anon, "peak_anon_rss": sampler.stop(),
            "peak_child_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def probe(path: Path, domain: str, num_proc: int | None = None, timeout: float = 7200) -> dict:
    """`probe_here` in a fresh process (its peak is then this preparation's alone)."""
    cmd = [sys.executable, __file__, "--probe", str(path), "--domain", domain,
           *(["--num_proc", str(num_proc)] if num_proc else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"probe of {path} failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def synthetic_file(domain: str, sample_file: str, as_messages: bool, size: int, path: Path,
                   row_bytes: int = 0) -> Path:
    """About `size` bytes of JSON lines: the sample file's rows repeated, each made distinct by a numbered text field
    (so that deduplication keeps them all) and that field (the answer of a chat) repeated to about `row_bytes`;
    `as_messages`: converted to the messages schema first."""
    from lora_recipes.data import DropRow, detect_schema, read_file

    samples = read_file(SAMPLES / domain / sample_file)
    if as_messages:
        schema = detect_schema(samples[0].keys(), importlib.import_module(f"data.{domain}").SCHEMAS, sample_file)
        chats = []
        for row in samples:
            try:
                chats.append({"messages": schema.to_messages(row)["messages"]})
            except DropRow:  # the samples hold a few rows the converter skips on purpose
                continue
        samples = chats
    lengthened = []
    for row in samples:
        row = json.loads(json.dumps(row))
        holder, key = (row["messages"][-1], "content") if as_messages else (
            row, next(k for k, v in row.items() if isinstance(v, str) and len(v) > 20))
        copies = max(1, (row_bytes - len(json.dumps(row))) // (len(holder[key]) + 1) + 1)
        holder[key] = " ".join([holder[key]] * copies)
        lengthened.append(row)
    with path.open("w", encoding="utf-8") as f:
        i = 0
        while f.tell() < size:
            row = dict(lengthened[i % len(lengthened)])
            if as_messages:  # the first user turn (deduplication leaves the system prompt out)
                user = next(n for n, m in enumerate(row["messages"]) if m["role"] == "user")
                row["messages"] = [*row["messages"][:user], {**row["messages"][user], "content":
                                   f"{row['messages'][user]['content']} (#{i})"}, *row["messages"][user + 1:]]
            else:
                text_field = next(k for k, v in row.items() if isinstance(v, str) and len(v) > 20)
                row[text_field] = f"{row[text_field]} (#{i})"
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            i += 1
    return path


def markdown(results: dict) -> str:
    lines = [f"Command: `{results['command']}` on {results['machine']['cpu']} ({results['machine']['cpu_cores']} "
             "cores).", "",
             "| data preparation (`prepare_data`) | schema | load average at start | file size | rows | rows/s | "
             "MB/s | num_proc | peak memory | of which anonymous | worker process peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        load = r.get("load_average_at_start", results["machine"]["load_average_at_start"])
        lines.append(f"| {r['source']} | {r['schema']} | {load:.1f} | {r['file_bytes'] / 2**30:.2f} GiB | "
                     f"{r['rows']:,} | "
                     f"{r['rows_per_s']:,.0f} | {r['file_bytes'] / r['seconds'] / 1e6:,.1f} | {r['num_proc'] or 1} | "
                     f"{(r['peak_rss'] - r['baseline_rss']) / 2**20:,.0f} MiB | "
                     f"{(r['peak_anon_rss'] - r['baseline_anon_rss']) / 2**20:,.0f} MiB | "
                     + (f"{r['peak_child_rss'] / 2**20:,.0f} MiB |" if r["num_proc"] else "- |"))
    lines += ["", "Peak memory: the resident set's peak (VmHWM) above the one after the imports; anonymous: RssAnon's "
              "peak (sampled every 10 ms) above its value after the imports; worker process peak: the largest "
              "resident set of a conversion worker (num_proc > 1), whole."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", type=Path, help="measure this one file and print a JSON line")
    parser.add_argument("--domain", default="medical")
    parser.add_argument("--num_proc", type=int, default=None)
    parser.add_argument("--gigabytes", type=float, default=2.0, help="size of each generated file")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--schema", choices=("domain", "messages"), help="only this one of SCALE_SOURCES")
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe_here(args.probe, args.domain, args.num_proc)))
        return

    from bench.train_throughput import machine

    results = {"command": f"python bench/data_memory.py --gigabytes {args.gigabytes:g}"
                          + (f" --num_proc {args.num_proc}" if args.num_proc else "")
                          + (f" --schema {args.schema}" if args.schema else ""),
               "machine": machine("cpu"), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as workdir:
        for domain, sample_file, as_messages in SCALE_SOURCES:
            if args.schema and as_messages != (args.schema == "messages"):
                continue
            load = os.getloadavg()[0]  # per run: a shared machine's load changes between them
            path = synthetic_file(domain, sample_file, as_messages, int(args.gigabytes * 2**30),
                                  Path(workdir) / f"{domain}-{Path(sample_file).stem}.jsonl", ROW_BYTES)
            run = probe(path, domain, args.num_proc)
            run["source"] = f"{domain} / {Path(sample_file).stem}" + (", as messages" if as_messages else "")
            run["load_average_at_start"] = load
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            path.unlink()
    results["machine"]["platform"] = platform.platform()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "data-scale-cpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.output_dir / "data-scale-cpu.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
