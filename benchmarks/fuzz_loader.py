"""Mutation fuzzing of the model loader, as a user meets it: `shapscan inspect MUTANT` on
every mutant and a cheap `shapscan scan MUTANT --data samples/data/fewshot.npz` on a share.

    python benchmarks/fuzz_loader.py --mutants 3000            # a campaign; prints tables
    python benchmarks/fuzz_loader.py --mutants 200 --seconds 60 --seed 7
    python benchmarks/fuzz_loader.py --replay 1234 --seed 0 --keep /tmp/m   # one mutant

The oracle, for every command on every mutant: exit code in {0, 1, 2, 3}; no Python
traceback and no "internal error"; every stderr line is shapscan's own (`shapscan: ...`, no
runtime log spam), an error (exit 2/3) says itself in one line of stderr; no hang (over
`--timeout` seconds of CPU, or four times that of wall time); no file created or changed
outside `--out` (the mutant's folder, its parent, the working directory and TMPDIR,
compared before and after).

Commands run in a long-lived worker process that calls `scanner.cli.main` with its file
descriptors 1 and 2 redirected (what a terminal would show, C++ runtime logs included); a
hang or a dead worker is killed and replaced. Every `--subprocess-every`-th inspect also
runs as its own `python` process, as the console script does, and must agree.
Mutants come from benchmarks/fuzz_mutations.py: the same seed and index give the same bytes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz_mutations import Mutant, load_bases, make_mutant  # noqa: E402

DEFAULT_MODELS = (ROOT / "samples" / "models" / "cnn_badnets.onnx",
                  ROOT / "samples" / "models" / "silunet_trojan.onnx")
FEWSHOT = ROOT / "samples" / "data" / "fewshot.npz"
# The scan path up to a verdict at the least cost: one reverse step, no second view, no
# repair. Loading, preprocessing, the first session and the gradient graph all run.
FAST_POLICY = """name = "fuzz"
[detection]
reverse_steps = 1
second_view_steps = 1
synthesised_view = false
[repair]
enabled = false
"""
MEMORY_LIMIT = 6 << 30  # a mutant that asks for terabytes must not take the host with it
MAX_LINE = 1000
EXIT_CODES = frozenset({0, 1, 2, 3})


@dataclass
class Run:
    command: str
    code: int | None  # None: hung or the process died
    out: str
    err: str
    seconds: float
    hung: bool = False


@dataclass
class Violation:
    label: str
    command: str
    kind: str  # crash | traceback | hang | exit | output | stray-file | differs
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} in `{self.command}` on {self.label}: {self.detail}"


@dataclass
class Campaign:
    tried: int = 0
    seconds: float = 0.0
    codes: dict[str, Counter] = field(default_factory=dict)  # command -> exit code counts
    by_kind: dict[str, Counter] = field(default_factory=dict)  # mutator -> inspect codes
    violations: list[Violation] = field(default_factory=list)
    slowest: tuple[float, str] = (0.0, "")


def _limit_memory() -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _serve(conn: Connection) -> None:
    """The worker: run shapscan's entry point per request, fds 1 and 2 captured."""
    _limit_memory()
    sys.path.insert(0, str(ROOT))
    from scanner.cli import main
    while True:
        request = conn.recv()
        if request is None:
            return
        argv, cwd = request
        os.chdir(cwd)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            sys.stdout.flush()
            sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            start = time.perf_counter()
            try:
                code = main(argv)
            except BaseException:  # what the console script would show: a traceback, exit 1
                traceback.print_exc()
                code = 1
            seconds = time.perf_counter() - start
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            texts = []
            for f in (out, err):
                f.seek(0)
                texts.append(f.read().decode("utf-8", "replace"))
        conn.send((code, texts[0], texts[1], seconds))


class Worker:
    """A long-lived process running shapscan commands; replaced when it hangs or dies."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        saved = dict(os.environ)
        os.environ.update(self._env)  # a spawned child starts from this environment
        try:
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(target=_serve, args=(child,), daemon=True)
            self._proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        child.close()
        self.run(["--version"], str(ROOT), timeout=120)  # imports, outside any timing

    def run(self, argv: list[str], cwd: str, timeout: float) -> Run:
        command = "shapscan " + " ".join(argv[:1])
        start = time.perf_counter()
        cpu = _cpu_seconds(self._proc.pid)
        try:
            self._conn.send((argv, cwd))
            while not self._conn.poll(1.0):
                if _hung(start, _cpu_seconds(self._proc.pid) - cpu, timeout):
                    hung = True
                    break
            else:
                code, out, err, seconds = self._conn.recv()
                return Run(command, code, out, err, seconds)
        except (EOFError, OSError, BrokenPipeError):
            hung = False
        self._proc.kill()
        self._proc.join()
        signal = self._proc.exitcode
        self._start()
        what = "" if hung else f"worker died (exit {signal})"
        return Run(command, None, "", what, time.perf_counter() - start, hung=hung)

    def close(self) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (all its threads), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _hung(start: float, cpu: float, timeout: float) -> bool:
    """A hang: `timeout` seconds of CPU, or four times that of wall time (a blocking read
    burns no CPU). CPU, not wall time, so that a busy machine does not fake hangs."""
    return cpu > timeout or time.perf_counter() - start > 4 * timeout


def run_subprocess(argv: list[str], cwd: str, env: dict[str, str], timeout: float) -> Run:
    """The command as its own process, as the `shapscan` console script runs it."""
    cmd = [sys.executable, "-c", "from scanner.cli import run; run()", *argv]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=_limit_memory)
    while True:
        try:
            out, err = proc.communicate(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            if _hung(start, _cpu_seconds(proc.pid), timeout):
                os.killpg(proc.pid, 9)
                proc.communicate()
                return Run("subprocess shapscan " + argv[0], None, "", "",
                           time.perf_counter() - start, hung=True)
    code = proc.returncode if proc.returncode >= 0 else None
    return Run("subprocess shapscan " + argv[0], code, out.decode("utf-8", "replace"),
               err.decode("utf-8", "replace"), time.perf_counter() - start)


def judge(run: Run, one_error_line: bool) -> list[tuple[str, str]]:
    """The oracle for one command: (kind, detail) per broken promise."""
    if run.hung:
        return [("hang", f"stopped after {run.seconds:.0f} s")]
    if run.code is None:
        return [("crash", run.err or "the process died")]
    found = []
    if any(line.startswith("Traceback (most recent call last)")
           for line in (run.out + "\n" + run.err).splitlines()):
        found.append(("traceback", _tail(run.err or run.out)))
    if "internal error" in run.err:
        found.append(("crash", _first(run.err, "internal error")))
    if run.code not in EXIT_CODES:
        found.append(("exit", f"exit code {run.code}"))
    lines = [line for line in run.err.splitlines() if line.strip()]
    foreign = [line for line in lines if not line.startswith("shapscan: ")]
    if foreign:
        found.append(("output", f"stderr line not shapscan's: {foreign[0][:200]!r}"))
    if run.code in (2, 3) and (not lines or (one_error_line and len(lines) != 1)):
        found.append(("output", f"exit {run.code} with {len(lines)} stderr lines: "
                                f"{run.err[:300]!r}"))
    long = [line for line in lines if len(line) > MAX_LINE]
    if long:
        found.append(("output", f"stderr line of {len(long[0])} characters"))
    return found


def _first(text: str, needle: str) -> str:
    return next((line for line in text.splitlines() if needle in line), "")[:300]


def _tail(text: str) -> str:
    return " | ".join(text.strip().splitlines()[-3:])[:400]


def listing(folder: Path, skip: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under `folder` but `skip`: (mode, size, mtime) by relative path."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in dirnames:  # a folder's own mtime moves when a temp file comes and goes
            entries[str((here / name).relative_to(folder))] = (os.lstat(here / name).st_mode,
                                                                0, 0)
        for name in filenames:
            st = os.lstat(here / name)
            entries[str((here / name).relative_to(folder))] = (st.st_mode, st.st_size,
                                                                 st.st_mtime_ns)
    return entries


def _stray(before: dict, after: dict) -> list[str]:
    return sorted(k for k in after if before.get(k) != after[k]) + \
        sorted(f"{k} (removed)" for k in before if k not in after)


def campaign(models: Sequence[Path] = DEFAULT_MODELS, mutants: int = 3000,
             seconds: float | None = None, seed: int = 0, scan_every: int = 10,
             subprocess_every: int = 50, timeout: float = 30.0, root: Path | None = None,
             verbose: bool = False) -> Campaign:
    """Make and judge up to `mutants` mutants, stopping after `seconds` if given."""
    bases = load_bases(list(models))
    result = Campaign()
    own_root = root is None
    root = Path(tempfile.mkdtemp(prefix="shapscan-fuzz-")) if root is None else root
    cwd, out, tmp = root / "cwd", root / "out", root / "tmp"
    for folder in (cwd, tmp):
        folder.mkdir(parents=True, exist_ok=True)
    policy = root / "fuzz-policy.toml"
    policy.write_text(FAST_POLICY)
    # TMPDIR inside the checked tree: a temp file left behind is a stray file too
    env = {"SHAPSCAN_THREADS": "1", "TMPDIR": str(tmp), "NO_COLOR": "1"}
    worker = Worker(env)
    start = time.perf_counter()
    try:
        for index in range(mutants):
            if seconds is not None and time.perf_counter() - start > seconds:
                break
            mutant = make_mutant(bases, seed, index)
            _one(mutant, root, cwd, out, policy, worker, env, index, scan_every,
                 subprocess_every, timeout, result)
            result.tried += 1
            if verbose and (index + 1) % 100 == 0:
                print(f"... {index + 1} mutants, {len(result.violations)} violations, "
                      f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    finally:
        worker.close()
        result.seconds = time.perf_counter() - start
        if own_root:
            shutil.rmtree(root, ignore_errors=True)
    return result


def _one(mutant: Mutant, root: Path, cwd: Path, out: Path, policy: Path, worker: Worker,
         env: dict[str, str], index: int, scan_every: int, subprocess_every: int,
         timeout: float, result: Campaign) -> None:
    folder = root / f"m{index:06d}"
    model = mutant.write(folder)
    commands = [("inspect", ["inspect", str(model)], True)]
    if scan_every and index % scan_every == 0:
        commands.append(("scan", ["scan", str(model), "--data", str(FEWSHOT), "--policy",
                                  str(policy), "--quiet", "--out", f"{out}{os.sep}",
                                  "--report", str(out / "report.json")], False))
    kind = mutant.kind.split("+")[0]
    label = mutant.label()
    for name, argv, one_line in commands:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        before = listing(root, out)
        run = worker.run(argv, str(cwd), timeout)
        found = judge(run, one_line)
        stray = _stray(before, listing(root, out))
        if stray:
            found.append(("stray-file", ", ".join(stray[:5])))
        if name == "inspect" and subprocess_every and index % subprocess_every == 0:
            alone = run_subprocess(argv, str(cwd), env, timeout)
            found += judge(alone, one_line)
            if alone.code != run.code:
                found.append(("differs", f"exit {alone.code} as a process, {run.code} "
                                         "in the worker"))
        result.codes.setdefault(name, Counter())["hang" if run.hung else run.code] += 1
        if name == "inspect":
            result.by_kind.setdefault(kind, Counter())[run.code] += 1
        if run.seconds > result.slowest[0]:
            result.slowest = (run.seconds, f"`{run.command}` on {label[:160]}")
        result.violations += [Violation(label, run.command, k, d) for k, d in found]
    shutil.rmtree(folder, ignore_errors=True)
    for name in mutant.outside:
        (root / name).unlink(missing_ok=True)


def table(result: Campaign) -> str:
    """The campaign as markdown: outcomes by command and by mutator, then violations."""
    columns = [0, 1, 2, 3, "other"]
    lines = [f"mutants tried: {result.tried} in {result.seconds:.0f} s "
             f"({result.seconds / max(result.tried, 1):.2f} s each)", "",
             "| command | runs | exit 0 | exit 1 | exit 2 | exit 3 | other | hang |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, codes in result.codes.items():
        other = sum(n for c, n in codes.items() if c not in EXIT_CODES and c != "hang")
        cells = [codes.get(c, 0) for c in columns[:4]] + [other, codes.get("hang", 0)]
        lines.append(f"| {name} | {sum(codes.values())} | " + " | ".join(map(str, cells)) + " |")
    lines += ["", "| mutator (inspect) | mutants | exit 0 | exit 2 | exit 3 | other |",
              "|---|---:|---:|---:|---:|---:|"]
    for kind, codes in sorted(result.by_kind.items()):
        other = sum(n for c, n in codes.items() if c not in (0, 2, 3))
        lines.append(f"| {kind} | {sum(codes.values())} | {codes.get(0, 0)} | "
                     f"{codes.get(2, 0)} | {codes.get(3, 0)} | {other} |")
    kinds = Counter(v.kind for v in result.violations)
    lines += ["", "violations: " + (", ".join(f"{k} {n}" for k, n in kinds.items()) or "none")]
    lines += [f"  - {v}" for v in result.violations[:50]]
    lines.append(f"slowest command: {result.slowest[0]:.1f} s, {result.slowest[1]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutants", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=",".join(str(m.relative_to(ROOT))
                                                     for m in DEFAULT_MODELS))
    parser.add_argument("--scan-every", type=int, default=10,
                        help="also scan every N-th mutant (0: never)")
    parser.add_argument("--subprocess-every", type=int, default=50,
                        help="also inspect every N-th mutant as its own process (0: never)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="CPU seconds per command before it counts as a hang")
    parser.add_argument("--replay", type=int, default=None, metavar="INDEX",
                        help="write mutant INDEX of --seed to --keep and print it")
    parser.add_argument("--keep", type=Path, default=None, help="folder for --replay")
    args = parser.parse_args(argv)
    models = [ROOT / m if not Path(m).is_absolute() else Path(m)
              for m in args.models.split(",")]
    if args.replay is not None:
        mutant = make_mutant(load_bases(models), args.seed, args.replay)
        folder = args.keep or Path(tempfile.mkdtemp(prefix="shapscan-mutant-")) / "m"
        path = mutant.write(folder)
        print(mutant.label())
        print(f"shapscan inspect {path}")
        return 0
    result = campaign(models, args.mutants, args.seconds, args.seed, args.scan_every,
                      args.subprocess_every, args.timeout, verbose=True)
    print(table(result))
    return 1 if result.violations else 0


if __name__ == "__main__":
    sys.exit(main())
