"""The GPU check's orchestrator: runs the sections in order of value, each under its own time cap and
the run's deadline, writing each section's JSON as soon as it finishes (and after every row), then a
summary Markdown table. Called by ``benchmarks/gpu/check.sh`` (see README.md beside this file)::

    python benchmarks/gpu/check.py run --mode gpu --out DIR [--deadline EPOCH] [--sections a,b]
    python benchmarks/gpu/check.py summary --out DIR

``run`` skips sections whose JSON already holds a final status, and marks one left ``running`` by a
process that died as ``crashed`` — so check.sh can start it again after a crash and lose nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

ROOT = HERE.parents[1]
# common (and torch) are imported by ``run`` only: ``summary`` stays light.

# name: (title, cap in seconds on the GPU). Order = value: the training table first.
SECTIONS: Dict[str, tuple] = {
    "train": ("CIFAR-10 DDPM++ training: fp32 / TF32 / bf16, vs diffusers UNet2DModel, memory, largest batch", 100),
    "pytest": ("pytest -m gpu (tests/test_gpu.py)", 75),
    "sampling": ("sampling: base vs SIMS (with / without sigma interval), batch 512", 50),
    "compile": ("bf16 + torch.compile vs bf16 eager", 150),
    "adm": ("ImageNet-64 ADM training step", 45),
    "fd": ("FD on 10k samples (Inception-v3 features)", 40),
    "loader": ("data loader from an EDM zip", 40),
}
CPU_SECTIONS = ("train", "compile")  # --mode cpu: the figures of the CPU table
# Caps off the GPU: the dry run's toy sections take seconds (a slow CI machine gets room); the CPU
# figures run EDM's CIFAR-10 network at batch 8, minutes per table on two cores.
OTHER_CAPS = {"dry-run": 120, "cpu": 2400}
MAX_FILES = 8  # what the device tool returns from $OUT


def section_fns() -> Dict[str, Callable]:
    from sections_other import section_fd, section_loader, section_sampling
    from sections_train import section_adm, section_compile, section_train

    return {"train": section_train, "pytest": section_pytest, "sampling": section_sampling,
            "compile": section_compile, "adm": section_adm, "fd": section_fd, "loader": section_loader}


# ------------------------------------------------------------------------------------------ pytest
PYTEST_COLUMNS = ["suite", "passed", "failed", "skipped", "errors", "seconds", "status"]


def section_pytest(sec, mode, args) -> str:
    """``python -m pytest -m gpu tests/test_gpu.py`` in a subprocess (its own timeout), each test's outcome."""
    from common import remaining_s

    test_file = ROOT / "tests" / "test_gpu.py"
    if not test_file.exists():
        sec.note("not built (no tests/test_gpu.py)")
        return "not built"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", str(test_file.relative_to(ROOT)), "-q", "-rA",
           "-p", "no:cacheprovider"]
    timeout = max(5.0, min(remaining_s(), sec.cap_s) - 3)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc = "timeout"
    seconds = time.perf_counter() - t0
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
    for num, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", out.splitlines()[-1] if out else ""):
        key = "errors" if word.startswith("error") else word
        if key in counts:
            counts[key] = int(num)
    table = sec.table("pytest -m gpu", PYTEST_COLUMNS)
    outcomes = sec.table("tests", ["test", "outcome"])
    for line in out.splitlines():
        m = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(?:\[\d+\]\s+)?(\S+)(.*)$", line)
        if m:
            outcomes.add(test=m.group(2).rstrip(":"), outcome=m.group(1).lower() + (m.group(3)[:120] if m.group(1) == "SKIPPED" else ""))
    ok = rc == 0 and counts["failed"] == 0 and counts["errors"] == 0 and (counts["passed"] > 0 or not mode.cuda)
    status = "ok" if ok else ("timeout" if rc == "timeout" else "error")
    table.add(suite="tests/test_gpu.py -m gpu", **counts, seconds=seconds, status=status, returncode=rc)
    if not mode.cuda:
        sec.note(f"no CUDA here: the {counts['skipped']} GPU tests are skipped (they run on the GPU machine)")
    if status != "ok":
        sec.note("pytest output (tail):\n" + out[-3000:])
    return status


# ------------------------------------------------------------------------------------------ run
def run(args) -> int:
    import torch

    from common import Mode, NotBuilt, Section, SectionTimeout, time_cap, timeout_in_chain

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "gpu":
        if not torch.cuda.is_available():
            print("check.py: --mode gpu but CUDA is not available (use --dry-run on a CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    mode = Mode(args.mode, device)
    if mode.dry:
        # Toy ops are too small to share out: one thread avoids OpenMP barrier stalls on a busy machine.
        torch.set_num_threads(1)
    names = [s for s in (args.sections.split(",") if args.sections else
                         (CPU_SECTIONS if args.mode == "cpu" else SECTIONS)) if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        print(f"check.py: unknown sections {unknown}; valid: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    fns = section_fns()
    deadline = args.deadline or (time.time() + 3600)
    for name in names:
        path = out / f"{name}.json"
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                old = {}
            if old.get("status") == "running":  # its process died inside it
                old["status"] = "crashed"
                old.setdefault("notes", []).append("the process died inside this section (see the run's log)")
                from common import write_json

                write_json(path, old)
                print(f"[{name}] crashed in an earlier process: not retried", flush=True)
                continue
            if old.get("status"):
                continue
        title, cap = SECTIONS[name]
        cap = cap if args.mode == "gpu" else OTHER_CAPS[args.mode]
        sec = Section(name, title, mode, out, cap)  # (the first one also looks up the package versions)
        left = deadline - time.time()
        if left < 8:
            sec.note(f"skipped: {left:.0f} s left in the run's budget")
            sec.finish("skipped")
            continue
        cap_now = min(cap, left)
        print(f"=== {name}: {title} (cap {cap_now:.0f} s)", flush=True)
        try:
            with time_cap(cap_now):
                status = fns[name](sec, mode, args)
        except SectionTimeout as exc:
            sec.note(f"timeout: {exc}")
            status = "timeout"
        except NotBuilt as exc:
            sec.note(f"not built: {exc}")
            print(f"[{name}] not built", flush=True)
            status = "not built"
        except Exception as exc:  # noqa: BLE001 - recorded; the next section still runs
            if timeout_in_chain(exc) is not None:
                sec.note(f"timeout: {timeout_in_chain(exc)} (raised inside {type(exc).__name__})")
                status = "timeout"
            else:
                sec.note(f"error: {type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}")
                status = "error"
        if status == "not built":
            print(f"[{name}] not built", flush=True)
        sec.finish(status)
        print(f"=== {name}: {status} in {sec.data['seconds']:.1f} s", flush=True)
        try:
            import torch as _t

            if _t.cuda.is_available():
                _t.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
    return 0


# ------------------------------------------------------------------------------------------ summary
def fmt(col: str, v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v / 1e6:.2f}M" if col == "params" else f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        if col.startswith("mfu"):
            return f"{100 * v:.3g}%"
        if col in ("params",):
            return f"{v / 1e6:.2f}M"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, list):
        return " ".join(fmt(col, x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def summary(args) -> int:
    """summary.md from every section JSON in ``--out`` (one file; also printed)."""
    out = Path(args.out)
    data = []
    for name in SECTIONS:
        p = out / f"{name}.json"
        if p.exists():
            try:
                data.append(json.loads(p.read_text()))
            except json.JSONDecodeError as exc:
                data.append({"section": name, "status": "unreadable", "notes": [str(exc)], "tables": []})
    lines = ["# sims GPU check — summary", ""]
    env = next((d.get("env") for d in data if d.get("env")), {}) or {}
    mode = env.get("mode", "?")
    lines.append(f"mode **{mode}**; device {env.get('gpu') or env.get('device', '?')}; torch {env.get('torch', '?')}; "
                 f"CUDA {env.get('cuda', '-')}; python {env.get('python', '?')}; diffusers {env.get('diffusers', '?')}; "
                 f"torch-fidelity {env.get('torch_fidelity', '?')}; {env.get('cpu_count', '?')} CPUs "
                 f"(load {env.get('loadavg_1m', '?')}); {time.strftime('%Y-%m-%d %H:%M')}")
    if env.get("install"):
        lines.append(f"install: {env['install']}")
    if mode == "dry-run":
        lines.append("")
        lines.append("**Dry run**: toy sizes on the CPU; the figures check the schema, not the speed.")
    lines.append("")
    lines.append("MFU = FLOPs of one forward+backward (FlopCounterMode) ÷ step time ÷ 790 TFLOP/s (bf16 rate "
                 "measured on this H200); mfu_990 against the datasheet's 990.")
    lines.append("")
    lines.append("| section | status | seconds |")
    lines.append("|---|---|---|")
    for d in data:
        lines.append(f"| {d.get('section')} | {d.get('status')} | {fmt('s', d.get('seconds'))} |")
    for d in data:
        lines += ["", f"## {d.get('section')}: {d.get('title', '')} — {d.get('status')}", ""]
        for t in d.get("tables", []):
            cols = t["columns"]
            lines.append(f"**{t['name']}**")
            lines.append("")
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "---|" * len(cols))
            for r in t["rows"]:
                lines.append("| " + " | ".join(fmt(c, r.get(c)) for c in cols) + " |")
            lines.append("")
        for n in d.get("notes", []):
            first = str(n).splitlines()[0] if str(n) else ""
            lines.append(f"- {first}")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    files = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    if len(files) > MAX_FILES:
        print(f"warning: {len(files)} files in {out}, the device tool returns at most {MAX_FILES}", file=sys.stderr)
    print(text)
    return 0


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--mode", choices=["gpu", "dry-run", "cpu"], required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--deadline", type=float, default=None, help="absolute time (epoch s) the run must end by")
    r.add_argument("--sections", default=None, help="comma list (default: all, in order; cpu mode: train,compile)")
    r.add_argument("--batch", type=int, default=None, help="training batch (default: 512 GPU, 8 CPU, 4 dry run)")
    r.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default 512 on the GPU)")
    r.add_argument("--compile-cap", type=float, default=120.0, help="seconds torch.compile may take")
    s = sub.add_parser("summary")
    s.add_argument("--out", required=True)
    args = p.parse_args(argv)
    return run(args) if args.cmd == "run" else summary(args)


if __name__ == "__main__":
    sys.exit(main())
