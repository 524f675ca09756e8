"""The code reward's trust boundary (issue 21, items 1-5): nothing the program says makes the trainer import
a module, no builtin is shadowed, no secret or host file is visible, no reward ends the trainer, no zombie stays."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

import rewards
from rewards.code import code_reward, isolation
from rewards.combine import RewardError, RewardSet

ROOT = Path(__file__).resolve().parents[1]
MBPP = (ROOT.parent / "shared" / "data" / "mbpp_sanitized.jsonl").resolve()
GOOD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 5) == 7"]


def _fake_module(name: str) -> str:
    """A program that reports a module named `name` without importing it in the sandbox (a plain module object
    whose __name__ it chose), then solves the task: only the harness importing `name` could hurt."""
    return f"import types\nm = types.ModuleType({name!r})\n" + GOOD


def test_program_cannot_make_the_harness_import_a_module(monkeypatch):
    # `unittest.__main__` runs unittest's command line on import: with this argv it prints help and SystemExit
    monkeypatch.setattr(sys, "argv", ["trainer", "--help"])
    for name in ("unittest.__main__", "wave", "tabnanny"):
        sys.modules.pop(name, None)
        total, per = RewardSet([("code", 1.0)])([_fake_module(name)], [{"tests": ADD_TESTS}])
        assert per["code"] == [1.0]  # the program is right; its report is simply not acted on
        assert name not in sys.modules, name


def test_tests_see_allowed_modules_the_program_imported():
    # MBPP 596 uses the solution's `import sys` in its tests (no test_imports)
    prog = "import sys\ndef size(t):\n    return sys.getsizeof(t)\n"
    assert code_reward([prog], tests=[["assert size((1, 2)) == sys.getsizeof((1, 2))"]]) == [1.0]


@pytest.mark.parametrize("exc", [SystemExit(0), KeyboardInterrupt(), GeneratorExit(), BaseException("x")])
def test_no_base_exception_from_a_reward_ends_the_trainer(exc, caplog):
    def bad(completions, **kw):
        raise exc

    total, per = RewardSet([("bad", 1.0, bad), ("tag_count", 1.0)])(["<think>"], [{}])
    assert per == {"bad": [0.0], "tag_count": [0.25]}
    assert f"'bad' failed on all rows: {type(exc).__name__}" in caplog.text
    with pytest.raises(RewardError, match=type(exc).__name__):
        RewardSet([("bad", 1.0, bad)], on_error="raise")(["a"], [{}])


def test_a_real_ctrl_c_of_the_trainer_still_stops_it():
    def interrupted(completions, **kw):
        signal.raise_signal(signal.SIGINT)  # what the terminal sends on Ctrl-C
        return [1.0] * len(completions)

    # a trainer process has Python's default handler; in the full suite an earlier test can leave another one
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            RewardSet([("slow", 1.0, interrupted)])(["a"], [{}])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # left as it was
    finally:
        signal.signal(signal.SIGINT, previous)


def test_program_cannot_shadow_a_builtin_the_tests_call():
    he = {"test": "def check(candidate):\n    assert abs(candidate(1.0) - 2.0) < 1e-6\n", "entry_point": "f"}
    cheat = "def f(x):\n    return 0.0\ndef abs(x):\n    return 0\n"
    right = "def f(x):\n    return 2 * x\ndef abs(x):\n    return 0\n"  # its own `abs` must not be used either
    assert code_reward([cheat, right], tests=[he, he]) == [0.0, 1.0]
    # A task whose solution is named like a builtin: `len` is not the solution, `sum` is
    tests = ["assert len(sum([1, 2, 3])) == 2"]
    len_cheat = "def len(x):\n    return 2\n"
    honest = "def sum(xs):\n    return [a + b for a, b in zip(xs, xs[1:])]\n"
    assert code_reward([len_cheat], tests=[tests]) == [0.0]
    wrong_sum = "def sum(xs):\n    return 0\n"
    assert code_reward([len_cheat + wrong_sum, len_cheat + honest, honest], tests=[tests] * 3,
                       entry_point=["sum"] * 3) == [0.0, 1.0, 1.0]
    # with only one builtin name in the tests, that name is the solution (MBPP task 126 is `def sum(a, b)`)
    assert code_reward(["def sum(a, b):\n    return a - b\n"], tests=[["assert sum(5, 2) == 3"]]) == [1.0]


def test_sandbox_sees_no_secret_from_the_environment(monkeypatch):
    secrets = {k: f"secret-{uuid.uuid4().hex}" for k in ("HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY")}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    probe = textwrap.dedent(f"""
        import glob, os
        want = {list(secrets.values())!r}
        seen = " ".join(os.environ.values())
        for p in glob.glob('/proc/*/environ'):
            try:
                seen += open(p, errors='replace').read()
            except OSError:
                pass
        if any(s in seen for s in want):
            def add(a, b):
                return a + b
        """)
    assert code_reward([probe], tests=[ADD_TESTS]) == [0.0]
    env = code_reward(["import os\nprint(sorted(os.environ))"], tests=[{"inputs": [""], "outputs": ["x"]}])
    assert env == [0.0]
    out = subprocess.run([sys.executable, "-c", "import json, sys; from rewards.code import run_tests\n"
                          "print(json.dumps(run_tests('import os; print(sorted(os.environ))', "
                          "{'inputs': [''], 'outputs': [\"['HOME', 'LANG', 'PATH']\"]})))"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert json.loads(out.stdout) == [True]  # exactly these three, nothing of the trainer's


@pytest.fixture
def host_file():
    """A world-readable file in a world-searchable host directory that is not /tmp (fresh tmpfs already)."""
    d = tempfile.mkdtemp(prefix="r1-host-", dir="/opt" if os.access("/opt", os.W_OK) else None)
    os.chmod(d, 0o755)
    path = Path(d, "answers.txt")
    path.write_text("assert add(2, 5) == 7\n")
    os.chmod(path, 0o644)
    yield path
    path.unlink()
    os.rmdir(d)


def test_sandbox_sees_only_python_and_its_scratch_dir(host_file):
    if isolation() != "namespaces":
        pytest.skip(f"file isolation needs the namespaces level (active: {isolation()})")
    targets = [str(host_file), "/etc/passwd", "/etc/hostname", str(MBPP), str(ROOT / "README.md"),
               "/proc/1/root/etc/passwd", "/root"]
    probe = textwrap.dedent(f"""
        import os
        seen = []
        for p in {targets!r}:
            try:
                seen.append(os.listdir(p) if os.path.isdir(p) else open(p).read(100))
            except OSError:
                pass
        if seen:
            def add(a, b):
                return a + b
        """)
    assert code_reward([probe], tests=[ADD_TESTS]) == [0.0]
    # what a program does need still works: the stdlib (C extensions too), its scratch dir, a subprocess
    works = textwrap.dedent("""
        import decimal, json, os, subprocess, sys, tempfile
        open('scratch.txt', 'w').write('5')
        with tempfile.NamedTemporaryFile('w') as f:
            f.write('x')
        five = int(open('scratch.txt').read())
        two = int(subprocess.run([sys.executable, '-c', 'print(2)'], capture_output=True).stdout)
        def add(a, b):
            return int(decimal.Decimal(a) + decimal.Decimal(b)) + five - five + two - two
        """)
    assert code_reward([works], tests=[ADD_TESTS]) == [1.0]
    listing = code_reward(["import os\nprint(sorted(os.listdir('/')))"],
                          tests=[{"inputs": [""], "outputs": ["x"]}])
    assert listing == [0.0]


def test_generic_replay_of_an_answer_key_fails():
    """The attack of issue 21: read the benchmark's file, find this task's asserts, answer from them."""
    if isolation() != "namespaces" or not MBPP.exists():
        pytest.skip("needs the namespaces level and the MBPP file")
    rows = [json.loads(line) for line in MBPP.open()][:10]
    replay = textwrap.dedent(f"""
        import json, re
        TABLE = {{}}
        try:
            for line in open({str(MBPP)!r}):
                for t in json.loads(line)['test_list']:
                    m = re.match(r'assert (\\w+)\\((.*)\\) == (.*)$', t)
                    if m:
                        TABLE.setdefault(m[1], {{}})[m[2]] = m[3]
        except OSError:
            pass
        def _make(name):
            def f(*args):
                for k, v in TABLE[name].items():
                    if eval('(' + k + ',)') == args:
                        return eval(v)
            return f
        for _name in TABLE:
            globals()[_name] = _make(_name)
        """)
    scores = code_reward([replay] * len(rows), test_list=[r["test_list"] for r in rows],
                         test_imports=[r["test_imports"] for r in rows], workers=2)
    assert max(scores) == 0.0, scores


ZOMBIES = textwrap.dedent("""
    import ctypes, os, sys, time
    from pathlib import Path
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to us, as to PID 1
    import rewards
    from rewards.code import code_reward

    def zombies():
        pids = [int(p) for t in Path('/proc/self/task').iterdir() for p in (t / 'children').read_text().split()]
        return [p for p in pids if Path(f'/proc/{p}/stat').read_text().rsplit(')', 1)[1].split()[0] == 'Z']

    progs = ["def add(a, b):\\n    return a + b\\n",
             "def add(a, b):\\n    while True:\\n        pass\\n",
             "import os\\nif os.fork() == 0:\\n    os.setsid()\\n    while True:\\n        pass\\n",
             "import os\\nos._exit(1)\\n"] * 3
    code_reward(progs, tests=[["assert add(1, 2) == 3"]] * len(progs), per_test=0.5, total=1.0, workers=2)
    time.sleep(1.0)  # a killed PID namespace is torn down asynchronously
    rewards.shutdown()
    print(len(zombies()))
    """)


@pytest.mark.parametrize("level", ["namespaces", "uid"])
def test_no_zombies_when_the_trainer_reaps_orphans(level):
    if os.geteuid() != 0:
        pytest.skip("the namespaces and uid levels need root")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "R1_SANDBOX": level}
    out = subprocess.run([sys.executable, "-c", ZOMBIES], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0"], out.stdout


def test_shutdown_is_public_and_stops_the_workers():
    from rewards.pool import shared_pool

    pool = shared_pool("operator:neg", 1, 3.0)
    assert pool.map([1]) == [-1]
    procs = [w.proc for w in pool._pool]
    rewards.shutdown()
    assert procs and all(p.poll() is not None for p in procs)
    assert pool.map([2]) == [-2]  # a later call starts fresh workers


def test_program_cannot_end_a_test_s_iteration_early():
    # a StopIteration from the program, re-raised inside map(), would end list() early instead of failing
    cheat = "def double(x):\n    raise StopIteration\n"
    tests = ["assert list(map(double, [1, 2])) == []", "assert double(2) == 4"]
    assert code_reward([cheat], tests=[tests]) == [0.0]
    bad = "def double(x):\n    raise ValueError('no')\n"
    assert code_reward([bad], tests=[["try:\n    double(1)\nexcept ValueError:\n    pass"]]) == [1.0]


def test_reaping_orphans_never_takes_a_live_run_s_exit_status():
    """Another run's close() reaps orphans while this run's program has exited but its status is unread: the
    status must stay this run's (a stolen one reads as 0, a pass, for a program that failed)."""
    import time

    from rewards.sandbox import Run, reap_orphans

    if os.geteuid() != 0:
        pytest.skip("the uid level needs root")
    run = Run("import sys\nprint('right output')\nsys.exit(3)\n", "stdio", level="uid")
    try:
        run.exchange(b"", time.monotonic() + 20, until_newline=False, close_stdin=True)
        stat = Path(f"/proc/{run.proc.pid}/stat")
        for _ in range(2000):  # until the runner is a zombie: exited, status not yet read
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        reap_orphans()
        assert run.returncode(time.monotonic() + 20) == 3
    finally:
        run.close()
