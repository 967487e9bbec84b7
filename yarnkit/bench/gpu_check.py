"""The GPU check: every GPU-only path of yarnkit runs once, each in a process of its own, within a time budget.

    python scripts/gpu_check.py --out runs/gpu-check          # on one H100/H200: about 3 minutes (make gpu-check)
    python scripts/gpu_check.py --paths recipe,runtime        # some paths only (a name, or a prefix: recipe)
    python scripts/gpu_check.py --recipes tiny,my-recipe.yaml # other recipes than the shipped single-GPU ones
    python scripts/gpu_check.py --cpu-smoke --out /tmp/gc     # the same paths at tiny sizes on CPU
    python -m yarnkit.bench.gpu_check ...                     # an installed wheel: e2e and gpu-tests need a checkout

The paths (`yarnkit.bench.gpu_paths` says what each one runs and checks): `bundled-model` first and alone (it
converts the model the others read), then `--jobs` at a time, the longest first: `gpu-tests` (pytest -m gpu),
`e2e` (train -> eval -> export), `bench` (one step of each benchmark group), `runtime` (graph and compiled decode
on the real weights), `export` (HF and GGUF checks), `retrieval`, and `recipe:NAME` for each single-GPU recipe.
The paths share the GPU: none of them measures speed against a target, so running side by side changes no result.

Each path gets its own process group and log (OUT/logs/NAME.log) and runs until its own time limit or the end
of `--budget-s`, whichever comes first; then it is stopped (`timeout`). A path that has not started when the
budget runs out is `not run`. OUT/gpu_check.json holds the device, the versions, the command and, per path,
the status (pass, fail, timeout, not run), the seconds, the one-line error, the summary and the path's own
result. It is written again each time a path ends. The table is printed last. The exit code is 0 when every path
passed, 1 otherwise. Without CUDA it refuses in one line (exit 2) unless `--cpu-smoke` is given.
Tested on CPU by tests/test_gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yarnkit
from yarnkit.bench.recipe_shapes import single_gpu_recipes
from yarnkit.errors import AlreadyExists, BadValue, UserError
from yarnkit.outputs import write_json_atomic

PACKAGE_ROOT = Path(yarnkit.__file__).resolve().parent.parent
# seconds each path may run on one H100/H200 (the budget caps them all); --cpu-smoke allows CPU_SLOWER times more
LIMITS = {"bundled-model": 120, "gpu-tests": 230, "e2e": 220, "bench": 200, "runtime": 200, "export": 180,
          "retrieval": 150, "recipe": 150}
CPU_SLOWER = 8
BUDGET_S = {"cuda": 240, "cpu": 1800}
JOBS = {"cuda": 6, "cpu": 2}
STOP_GRACE_S = 10


@dataclass
class CheckPath:
    name: str
    command: list[str]
    result_dir: Path  # where the command writes result.json
    limit_s: float


def build_paths(args, out: Path) -> list[CheckPath]:
    """Every path the arguments select, `bundled-model` first, then the longest first."""
    slower = CPU_SLOWER if args.cpu_smoke else 1
    names = ["bundled-model", "gpu-tests", "e2e", "bench", "runtime", "export", "retrieval"]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()] if args.recipes else single_gpu_recipes()
    items = [(name, name, []) for name in names] + [
        (f"recipe:{Path(r).name}", "recipe", ["--recipe", r]) for r in recipes]
    wanted = [w.strip() for w in args.paths.split(",") if w.strip()] if args.paths else []
    known = [name for name, _, _ in items]
    unknown = [w for w in wanted if not any(n == w or n.startswith(f"{w}:") for n in known)]
    if unknown:
        raise BadValue(f"--paths {','.join(unknown)}: no such path", f"choose from {', '.join(known)} (or 'recipe')")
    paths = []
    for name, kind, extra in items:
        if wanted and name != "bundled-model" and not any(name == w or name.startswith(f"{w}:") for w in wanted):
            continue
        limit = LIMITS[kind] * slower
        result_dir = out / "paths" / name.replace(":", "-")
        command = [sys.executable, "-m", "yarnkit.bench.gpu_paths", kind, "--out", str(result_dir), "--shared",
                   str(out / "shared"), *extra, *(["--cpu-smoke"] if args.cpu_smoke else []),
                   *(["--e2e-script", args.e2e_script] if args.e2e_script else []),
                   *(["--tests", args.tests] if args.tests else []),
                   *(["--budget-s", str(int(limit) - 20)] if kind == "bench" else [])]
        paths.append(CheckPath(name, command, result_dir, limit))
    return paths


def child_env(jobs: int, cpu_smoke: bool) -> dict:
    """The paths' environment: this yarnkit first on PYTHONPATH, the cores shared out (unless the user set it)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))  # CPU ops; compiles keep theirs
    if cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run stays on the CPU even on a GPU machine
    return env


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the path's process group (accelerate's workers too), SIGKILL what is left after STOP_GRACE_S."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _finish(row: dict, path: CheckPath, code: int | None, log: Path, why_stopped: str = "") -> None:
    from yarnkit.bench.training import last_error

    result_file = path.result_dir / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    tail = last_error(log.read_text(errors="replace") if log.is_file() else "")
    if code is None:
        row.update(status="timeout", error=f"stopped {why_stopped}; last line: {tail}")
    elif code == 0 and result.get("passed", True):
        row.update(status="pass", summary=result.get("summary", ""))
    else:
        row.update(status="fail", error=result.get("error") or f"exited {code}: {tail}")
    if result.get("detail") is not None:
        row["detail"] = result["detail"]


def _start(path: CheckPath, log: str, env: dict | None, cwd: str | None) -> subprocess.Popen:
    path.result_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:  # its own process group: stopping it stops accelerate's workers too
        process = subprocess.Popen(path.command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   start_new_session=True)
    print(f"[{path.name}] started", flush=True)
    return process


def _ended(path: CheckPath, process: subprocess.Popen, stop_at: float, deadline: float) -> tuple[bool, str]:
    """(whether the path's process is over, why it was stopped: "" when it exited by itself)."""
    if process.poll() is not None:
        return True, ""
    if time.monotonic() < stop_at:
        return False, ""
    _stop(process)
    return True, f"at its limit of {path.limit_s:.0f} s" if stop_at < deadline else "when the budget ran out"


def run_paths(paths: list[CheckPath], logs: Path, deadline: float, jobs: int, env: dict | None, cwd: str | None,
              on_change=lambda rows: None) -> list[dict]:
    """Run `paths`, `jobs` at a time in list order, each in its own process group until its limit or `deadline`
    (time.monotonic()); returns one row per path, in order, and calls `on_change(rows)` as each one ends."""
    logs.mkdir(parents=True, exist_ok=True)
    rows = {p.name: {"name": p.name, "status": "not run", "seconds": 0.0, "log": str(logs / f"{p.name}.log")}
            for p in paths}
    pending, running = list(paths), []
    try:
        while pending or running:
            while pending and len(running) < jobs and time.monotonic() < deadline:
                path, now = pending.pop(0), time.monotonic()
                running.append((path, _start(path, rows[path.name]["log"], env, cwd), now,
                                min(now + path.limit_s, deadline)))
            if not running:  # the budget is spent: the rest stays "not run"
                break
            for item in list(running):
                path, process, started, stop_at = item
                ended, why = _ended(path, process, stop_at, deadline)
                if not ended:
                    continue
                running.remove(item)
                row = rows[path.name]
                row["seconds"] = round(time.monotonic() - started, 1)
                _finish(row, path, None if why else process.returncode, Path(row["log"]), why)
                print(f"[{path.name}] {row['status']} in {row['seconds']:.0f} s", flush=True)
                on_change(list(rows.values()))
            time.sleep(0.2)
    finally:  # Ctrl-C, or an error here: no path's process group outlives the check
        for _, process, _, _ in running:
            _stop(process)
    for path in pending:
        rows[path.name]["error"] = "not started: the budget ran out first"
    return list(rows.values())


def table(report: dict) -> str:
    """The pass/fail lines printed last."""
    rows = report["paths"]
    passed = sum(row["status"] == "pass" for row in rows)
    lines = [f"gpu_check: {passed}/{len(rows)} paths passed in {report['seconds']:.0f} s on {report['device']} "
             f"(budget {report['budget_s']:.0f} s) -> {report['json']}"]
    width = max((len(row["name"]) for row in rows), default=4)
    for row in rows:
        status = "pass" if row["status"] == "pass" else row["status"].upper()
        note = row.get("summary") if row["status"] == "pass" else row.get("error", "")
        lines.append(f"  {status:8s} {row['seconds']:6.1f} s  {row['name']:{width}s}  {(note or '')[:160]}")
    return "\n".join(lines)


def prepare_out(out: Path) -> None:
    """OUT is new, empty, or an earlier gpu_check's (its paths/ and logs/ are replaced; shared/ caches are kept)."""
    if out.is_dir() and any(out.iterdir()):
        if not (out / "gpu_check.json").is_file():
            raise AlreadyExists(f"--out {out} holds files that gpu_check did not write",
                                "pick a new folder (an earlier gpu_check's folder is reused)")
        for name in ("paths", "logs"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def run(args) -> int:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        raise UserError("gpu_check needs a CUDA GPU and torch sees none here",
                        "run it on the GPU machine (docs/training.md), or pass --cpu-smoke for the same paths at "
                        "tiny sizes on CPU")
    kind = "cpu" if args.cpu_smoke else "cuda"
    budget = args.budget_s or BUDGET_S[kind]
    jobs = args.jobs or JOBS[kind]
    out = Path(args.out).resolve()
    paths = build_paths(args, out)
    prepare_out(out)
    started = time.monotonic()
    deadline = started + budget
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "device": "cpu (--cpu-smoke)" if args.cpu_smoke else torch.cuda.get_device_name(0),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "command": " ".join(["gpu_check.py", *args.argv]), "budget_s": budget, "jobs": jobs,
              "e2e_script": args.e2e_script, "tests": args.tests, "json": str(out / "gpu_check.json"), "seconds": 0.0,
              "passed": False,
              "paths": [{"name": p.name, "status": "not run", "seconds": 0.0} for p in paths]}

    def save(rows):
        done = {row["name"]: row for row in rows}
        report["paths"] = [done.get(row["name"], row) for row in report["paths"]]
        report["seconds"] = round(time.monotonic() - started, 1)
        report["passed"] = all(row["status"] == "pass" for row in report["paths"])
        write_json_atomic(out / "gpu_check.json", report)

    save([])
    env, cwd = child_env(jobs, args.cpu_smoke), None
    first, rest = paths[:1], paths[1:]  # bundled-model alone: the others read what it converts
    save(run_paths(first, out / "logs", deadline, 1, env, cwd, save))
    save(run_paths(rest, out / "logs", deadline, jobs, env, cwd, save))
    print(table(report), flush=True)
    return 0 if report["passed"] else 1


def parse(argv: list[str] | None = None, e2e_script: str | None = None, tests: str | None = None
          ) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu-check", help="output folder (default runs/gpu-check)")
    parser.add_argument("--paths", help="comma list of paths to run (names, or a prefix such as recipe); "
                                        "default all. bundled-model always runs first")
    parser.add_argument("--recipes", help="comma list of recipe names or YAML files for the recipe paths "
                                          f"(default the single-GPU shipped ones: {','.join(single_gpu_recipes())})")
    parser.add_argument("--budget-s", type=float, help="stop everything after this many seconds "
                                                       f"(default {BUDGET_S['cuda']}; --cpu-smoke {BUDGET_S['cpu']})")
    parser.add_argument("--jobs", type=int, help=f"paths at a time (default {JOBS['cuda']}; --cpu-smoke {JOBS['cpu']})")
    parser.add_argument("--e2e-script", default=e2e_script,
                        help="the e2e path's script (default: the e2e script beside the gpu_check script)")
    parser.add_argument("--tests", default=tests, help="the gpu-tests path's tests folder (default: the checkout's)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the same paths on CPU at tiny sizes (checks the check itself; no GPU needed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, e2e_script: str | None = None, tests: str | None = None) -> int:
    """Entry point of scripts/gpu_check.py, which names its checkout's e2e script and tests folder; bad input is
    one line (`yarnkit: error: ...`, exit 2)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv, e2e_script, tests)
        args.argv = argv
        return run(args)
    except UserError as error:
        print(f"yarnkit: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
