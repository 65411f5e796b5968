"""Shared fixtures: composing the shipped Hydra config, tiny trainers, the real-data folder, and multi-process
runs (DDP ranks, the CLI) bounded so that a hang fails in about a minute naming the rank, leaving nothing running."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from lightning_tricks._lightning import Callback
from lightning_tricks.train import config_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LT_SHARED_DATA", ROOT.parent / "shared" / "data"))


# optional extras of pyproject.toml -> the module each one installs (tests that need one carry
# ``needs_extra(name)``: marked ``extras`` and skipped, with the install command, when it is absent)
EXTRAS = {
    "sweep": "hydra_plugins.hydra_optuna_sweeper",
    "cluster": "hydra_plugins.hydra_submitit_launcher",
    "timm": "timm",
}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported; a missing parent package (``hydra_plugins``) counts as absent."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def extra_marks(extra: str) -> list[pytest.MarkDecorator]:
    """Marks of a test (or ``pytest.param``) that needs the optional extra ``extra`` (see ``EXTRAS``)."""
    return [
        pytest.mark.extras,
        pytest.mark.skipif(
            not installed(EXTRAS[extra]), reason=f"needs the '{extra}' extra: pip install -e \".[{extra}]\""
        ),
    ]


def needs_extra(extra: str) -> Callable[[Callable], Callable]:
    """Decorator form of :func:`extra_marks`."""

    def decorate(test: Callable) -> Callable:
        for mark in extra_marks(extra):
            test = mark(test)
        return test

    return decorate


class EndProcessGroup(Callback):
    """Ends the gloo group when a DDP worker's fit ends; put it last in the callbacks. Left to process exit,
    gloo's threads sometimes abort the worker ("terminate called without an active exception", return code
    -6) after a run that finished correctly."""

    def teardown(self, trainer, pl_module, stage) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def write_fashion_like(directory: Path, n_train: int, n_test: int) -> Path:
    """Four Fashion-MNIST idx files in ``directory``: ``n_train`` training and ``n_test`` test 28x28 images
    whose class is their brightness band (so a model can learn it in a few steps)."""
    import numpy as np

    from lightning_tricks.data.files import write_idx

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = (rng.integers(0, 40, (n, 28, 28)) + 20 * y[:, None, None]).astype(np.uint8)
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", y)
    return directory


def compose_train(overrides: Sequence[str] = (), output_dir: str | os.PathLike | None = None) -> DictConfig:
    """The training config as ``python -m lightning_tricks.train OVERRIDES`` would see it."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread than on two contending ones (and CI has two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg("model=resnet", ...)``: a composed config writing into ``tmp_path``, quiet and tiny."""

    def make(*overrides: str) -> DictConfig:
        return compose_train(["trainer=debug", *overrides], output_dir=tmp_path)

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


# -- tests that start processes (DDP ranks, the CLI): a hang fails in about a minute, naming the rank that
# hung, and every process started is ended, whatever the outcome -------------------------------------------

#: seconds without progress (no CPU time used and no output written by any of the processes) that count as a
#: hang; a rank waiting for another in a collective or a rendezvous uses no CPU
HANG_S = float(os.environ.get("LT_HANG_S", "60"))
#: the most a multi-process test may run even while it makes progress
PROCESS_LIMIT_S = float(os.environ.get("LT_PROCESS_LIMIT_S", "600"))
_rank_runs = [0]  # run_ranks calls in progress: the spawn watchdog leaves those processes to them


def _stat(pid: int) -> tuple[str, int, int, int, int] | None:
    """``(state, ppid, session, cpu ticks, start tick)`` of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[3]), int(fields[11]) + int(fields[12]), int(fields[19])


def _live_processes() -> dict[int, tuple[str, int, int, int, int]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = _stat(int(entry.name))
            if state is not None and state[0] not in ("Z", "X"):  # zombies have ended
                found[int(entry.name)] = state
    return found


def _in_sessions(sessions: set[int]) -> list[int]:
    return sorted(pid for pid, s in _live_processes().items() if s[2] in sessions)


def _descendants(root: int) -> list[int]:
    procs = _live_processes()
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, s in procs.items() if s[1] == parent]
        found += children
        frontier += children
    return sorted(found)


def _cpu_ticks(pids: Sequence[int]) -> int:
    return sum(s[3] for s in (_stat(pid) for pid in pids) if s is not None)


def _rank_label(pid: int, named: dict[int, str]) -> str:
    """What a process is, for a hang report: its rank (and job) from its environment, else its command."""
    if pid in named:
        return f"{named[pid]} (pid {pid})"
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return f"pid {pid} (gone)"
    job = env.get("LT_DDP_JOB_CONFIG")
    job_name = f" of job {Path(job).parent.parent.name if Path(job).parent.name == '.hydra' else job}" if job else ""
    for key in ("LOCAL_RANK", "SLURM_PROCID", "RANK"):
        if env.get(key, "").isdigit():
            return f"rank {env[key]}{job_name} (pid {pid})"
    return f"pid {pid} ({cmd[:80]})"


def _where(dump: str) -> str:
    """The innermost Python frame of the main thread in a faulthandler dump: ``file:line in function``."""
    current = dump.find("Current thread")
    for line in dump[current if current >= 0 else 0 :].splitlines():
        line = line.strip()
        if line.startswith("File "):
            path, _, rest = line[5:].partition(", line ")
            return f"{Path(path.strip(chr(34))).name}:{rest}"
    return ""  # no dump: a launcher ended it first (torch's spawn join terminates the others of a failed rank)


def _dump_and_kill(pids: Sequence[int]) -> dict[int, str]:
    """Each process prints its Python stacks (SIGABRT, with faulthandler on) one after the other, then all
    are killed; returns where each one was, ``{pid: "file:line in function"}``, read from its stderr when that
    is a file (the pipes of ``run_ranks``, pytest's capture)."""
    where = {}
    for pid in pids:  # all held first: one dying must not let a launcher end the others before their dumps
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    for pid in pids:
        err = None
        with contextlib.suppress(OSError):
            err = open(f"/proc/{pid}/fd/2", "rb")  # noqa: SIM115 - closed below, after the process died
            if not stat.S_ISREG(os.fstat(err.fileno()).st_mode):
                err.close()
                err = None
        before = os.fstat(err.fileno()).st_size if err is not None else 0
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGABRT)  # delivered before a SIGTERM that may be pending (lower number)
            os.kill(pid, signal.SIGCONT)
        for _ in range(20):  # until it has died of it (its dump written)
            state = _stat(pid)
            if state is None or state[0] in ("Z", "X"):
                break
            time.sleep(0.1)
        if err is not None:
            err.seek(before)
            frame = _where(err.read().decode(errors="replace"))
            if frame:
                where[pid] = frame
            err.close()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return where


def _without_module_lists(path: Path, keep: int = 4000) -> str:
    """The end of an output file without faulthandler's long "Extension modules:" lines."""
    text = path.read_text(errors="replace")
    return "\n".join(line for line in text.splitlines() if not line.startswith("Extension modules:"))[-keep:]


class _Progress:
    """When the watched processes last worked: used CPU time at more than 2% of a core over 5 s (a rank
    waiting in gloo polls at well under 1%), or wrote output."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []  # (time, CPU ticks) over the last 5 s
        self.written, self.at = -1, time.monotonic()

    def idle_s(self, pids: Sequence[int], outputs: Sequence[Path] = ()) -> float:
        now, ticks = time.monotonic(), _cpu_ticks(pids)
        self.samples = [(t, n) for t, n in self.samples if now - t <= 5.0] + [(now, ticks)]
        written = sum(p.stat().st_size for p in outputs if p.exists())
        if ticks - self.samples[0][1] >= 10 or written != self.written:  # 0.1 s of CPU in 5 s, or output
            self.written, self.at = written, now
            self.samples = [(now, ticks)]
        return now - self.at


def run_ranks(
    commands: Sequence[Sequence[str]],
    *,
    cwd: str | os.PathLike,
    env: Mapping[str, str] | Sequence[Mapping[str, str]],
    labels: Sequence[str] | None = None,
    hang_s: float | None = None,
    limit_s: float | None = None,
) -> list[subprocess.CompletedProcess]:
    """Run ``commands`` at once, each in a session of its own (so it and every rank it starts can be ended
    together), and return their results when every one of their processes has ended.

    A hang (``hang_s`` seconds with no CPU time used and no output by any of them) or a run past ``limit_s``
    fails the test with the processes still running named by rank (``labels`` for the commands themselves,
    ``LOCAL_RANK`` / ``SLURM_PROCID`` for the ranks they start), their Python stacks, and each command's output;
    nothing is left running in any case.
    """
    hang_s = HANG_S if hang_s is None else hang_s
    limit_s = PROCESS_LIMIT_S if limit_s is None else limit_s
    envs = [env] * len(commands) if isinstance(env, Mapping) else list(env)
    names = list(labels) if labels is not None else [f"command {i}" for i in range(len(commands))]
    if labels is None and len(commands) == 1:
        names = ["rank 0 (the launching process)"]
    logs = Path(tempfile.mkdtemp(prefix="lt-ranks-"))
    procs: list[subprocess.Popen] = []
    outputs = []
    _rank_runs[0] += 1
    try:
        for i, (cmd, cmd_env) in enumerate(zip(commands, envs)):
            out, err = logs / f"{i}.out", logs / f"{i}.err"
            outputs += [out, err]
            with open(out, "wb") as fo, open(err, "wb") as fe:
                procs.append(
                    subprocess.Popen(
                        list(cmd),
                        cwd=cwd,
                        env={**cmd_env, "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"},
                        stdout=fo,
                        stderr=fe,
                        start_new_session=True,
                    )
                )
        sessions = {p.pid for p in procs}
        named = {p.pid: name for p, name in zip(procs, names)}
        progress, start = _Progress(), time.monotonic()
        while True:
            for p in procs:
                p.poll()  # reaps an ended command
            running = _in_sessions(sessions)
            if not running and all(p.returncode is not None for p in procs):
                break
            idle, took = progress.idle_s(running, outputs), time.monotonic() - start
            if idle > hang_s or took > limit_s:
                why = f"no progress for {idle:.0f} s (a hang)" if idle > hang_s else f"still running after {took:.0f} s"
                rank_of = {pid: _rank_label(pid, named) for pid in running}
                ended = "; ".join(f"{named[p.pid]} exited {p.returncode}" for p in procs if p.returncode is not None)
                where = _dump_and_kill(running)
                hung = "; ".join(f"{rank_of[pid]}" + (f" at {where[pid]}" if pid in where else "") for pid in running)
                for p in procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(5)
                tails = "\n".join(
                    f"--- {names[i // 2]} {path.suffix[1:]} ---\n{_without_module_lists(path)}"
                    for i, path in enumerate(outputs)
                )
                pytest.fail(f"{why}; hung: {hung}" + (f"; {ended}" if ended else "") + f"; all ended now\n{tails}")
            time.sleep(0.25)
        return [
            subprocess.CompletedProcess(
                p.args,
                p.returncode,
                (logs / f"{i}.out").read_text(errors="replace"),
                (logs / f"{i}.err").read_text(errors="replace"),
            )
            for i, p in enumerate(procs)
        ]
    finally:
        _rank_runs[0] -= 1
        for session in {p.pid for p in procs}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(session, signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        shutil.rmtree(logs, ignore_errors=True)


class _SpawnWatchdog(threading.Thread):
    """For a ``ddp`` test whose ranks are this process's children (``ddp_spawn``, ``ddp_fork``): on a hang
    it names the ranks still running, has them print their stacks and kills them, so that the test's join
    returns with an error instead of waiting for ever."""

    def __init__(self, hang_s: float, limit_s: float) -> None:
        super().__init__(daemon=True)
        self.hang_s, self.limit_s = hang_s, limit_s
        self.report = ""
        self.done = threading.Event()
        self.before = set(_descendants(os.getpid()))  # not this test's

    def _ranks(self) -> dict[int, str]:
        """This process's child processes, as ranks in the order they were started (helpers left out)."""
        procs = _live_processes()
        kids = []
        for pid in set(_descendants(os.getpid())) - self.before:
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"resource_tracker" not in cmd and b"forkserver" not in cmd and pid in procs:
                    kids.append((procs[pid][4], pid))
        return {pid: f"rank {i}" for i, (_, pid) in enumerate(sorted(kids))}

    def run(self) -> None:
        progress, start = _Progress(), time.monotonic()
        while not self.done.wait(0.5):
            ranks = self._ranks()
            if _rank_runs[0] or not ranks:
                progress = _Progress()  # run_ranks watches its own processes; no ranks: nothing to wait for
                continue
            idle, took = progress.idle_s(list(ranks)), time.monotonic() - start
            if idle > self.hang_s or took > self.limit_s:
                why = f"no progress for {idle:.0f} s (a hang)" if idle > self.hang_s else f"ran {took:.0f} s"
                where = _dump_and_kill(list(ranks))
                self.report = f"{why}; hung: " + "; ".join(
                    f"{r} (pid {pid})" + (f" at {where[pid]}" if pid in where else "") for pid, r in ranks.items()
                )
                return

    def stop(self) -> list[str]:
        """Stop watching; end (and name) any rank still running."""
        self.done.set()
        self.join()
        left = self._ranks()
        _dump_and_kill(list(left))
        return [f"{r} (pid {pid})" for pid, r in left.items()]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """``ddp`` tests run under :class:`_SpawnWatchdog`; a rank left running after the test fails it."""
    if item.get_closest_marker("ddp") is None:
        return (yield)
    saved = os.environ.get("PYTHONFAULTHANDLER")
    os.environ["PYTHONFAULTHANDLER"] = "1"  # spawned ranks print their stacks on SIGABRT
    watchdog = _SpawnWatchdog(HANG_S, PROCESS_LIMIT_S)
    watchdog.start()
    try:
        result = yield
    except BaseException as e:
        watchdog.stop()
        if watchdog.report:
            raise pytest.fail.Exception(f"{watchdog.report}; all ended now") from e
        raise
    finally:
        if saved is None:
            os.environ.pop("PYTHONFAULTHANDLER", None)
        else:
            os.environ["PYTHONFAULTHANDLER"] = saved
    left = watchdog.stop()
    if watchdog.report or left:
        pytest.fail(watchdog.report or f"ranks still running after the test: {'; '.join(left)} (ended now)")
    return result
