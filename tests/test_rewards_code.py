"""Code reward: MBPP references, stdin/stdout, HumanEval shape, and an adversarial suite against the sandbox."""

import json
import os
import time
import uuid
from pathlib import Path

import pytest

import rewards.sandbox as sandbox
from rewards.code import code_reward, extract_code, isolation, run_tests

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 5) == 7", "assert add(-4, 10) == 6"]
GOOD = "def add(a, b):\n    return a + b\n"


def _mbpp():
    path = DATA / "mbpp_sanitized.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found (benchmark data lives in ../shared/data)")
    return [json.loads(line) for line in path.open()]


def test_isolation_level():
    assert isolation() in sandbox.LEVELS
    if os.geteuid() == 0 and os.path.exists("/usr/bin/unshare"):
        assert isolation() == "namespaces"


def test_mbpp_references_pass_and_wrong_fails():
    rows = _mbpp()
    # per_test 60 s: task 123 (amicable numbers below 9999) needs ~2.5 s of CPU alone, 12 s on a loaded host
    scores = code_reward([r["code"] for r in rows], test_list=[r["test_list"] for r in rows],
                         test_imports=[r["test_imports"] for r in rows], workers=4, per_test=60, total=120)
    failed = [r["task_id"] for r, s in zip(rows, scores, strict=True) if s != 1.0]
    assert not failed, failed
    wrong = [r["code"].replace("return", "return None and", 1) for r in rows[:20]]
    scores = code_reward(wrong, test_list=[r["test_list"] for r in rows[:20]],
                         test_imports=[r["test_imports"] for r in rows[:20]], workers=4)
    assert all(s < 1.0 for s in scores), scores


def test_partial_credit_and_extraction():
    half = "```python\ndef add(a, b):\n    return 3 if a == 1 else a - b\n```"
    assert extract_code("text\n```python\nx = 1\n```\nmore") == "x = 1\n"
    assert code_reward([half], tests=[ADD_TESTS]) == [pytest.approx(1 / 3)]
    assert code_reward([half], tests=[ADD_TESTS], partial=False) == [0.0]
    assert code_reward([GOOD], tests=[json.dumps(ADD_TESTS)]) == [1.0]
    assert code_reward([GOOD, GOOD], tests=[ADD_TESTS, None]) == [1.0, None]


def test_exceptions_and_humaneval_shape():
    prog = "def safe_div(a, b):\n    if b == 0:\n        raise ValueError('b')\n    return a / b\n"
    tests = ["assert safe_div(6, 3) == 2.0", "try:\n    safe_div(1, 0)\n    assert False\nexcept ValueError:\n    pass"]
    assert run_tests(prog, tests) == [True, True]
    he = {"test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(0, 0) == 0\n",
          "entry_point": "add"}
    assert code_reward([GOOD, "def add(a, b):\n    return a * b\n"], tests=[he, he]) == [1.0, 0.0]


STDIO = {"inputs": ["3\n1 2 3\n", "2\n5 5\n"], "outputs": ["6\n1\n", "10\n2\n"]}  # sum, then max count


def test_stdin_stdout():
    good = "n = int(input())\nxs = list(map(int, input().split()))\nprint(sum(xs))\nprint(xs.count(max(xs)))\n"
    first_line_only = "input()\nprint(sum(map(int, input().split())))\n"  # a zip()-based compare would pass it
    wrong = good.replace("sum(xs)", "sum(xs) + 1")
    crash_after = good + "raise SystemExit(1)\n"
    scores = code_reward([good, first_line_only, wrong, crash_after, "print('6')"], tests=[STDIO] * 5)
    assert scores == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert code_reward([good + "print()  \n"], tests=[STDIO]) == [1.0]  # trailing whitespace is not wrong


def _adversaries(tag: str) -> dict[str, str]:
    """Each program tries to cheat or harm and must score 0; probes only solve the task if their attack works."""
    solve = "\n    def add(a, b):\n        return a + b\n"
    return {
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "memory bomb": "x = []\nwhile True:\n    x.append(bytearray(1 << 24))\n",
        "infinite loop": "def add(a, b):\n    while True:\n        pass\n",
        "long sleep": "import time\ndef add(a, b):\n    time.sleep(1000)\n",
        "network": "import socket\ntry:\n"
                   "    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
                   "    socket.getaddrinfo('example.com', 80)" + solve + "except OSError:\n    pass\n",
        "write outside": f"import os\nok = False\nfor p in ['/tmp/{tag}', '/var/tmp/{tag}', '/dev/shm/{tag}',"
                         f" '/etc/{tag}', '/root/{tag}', '{Path.cwd()}/{tag}', '/run/lock/{tag}']:\n"
                         "    try:\n        open(p, 'w').write('x')\n"
                         "        ok = ok or p.startswith(('/etc', '/root'))\n"
                         "    except OSError:\n        pass\nif ok:" + solve,
        "read tests": "import os, glob\nfound = False\n"
                      "for p in glob.glob('/proc/*/cmdline') + glob.glob('/proc/*/environ')"
                      " + glob.glob('/tmp/**', recursive=True) + glob.glob('/proc/*/fd/*'):\n"
                      "    try:\n        found = found or b'add(2, 5)' in open(p, 'rb').read(1 << 20)\n"
                      "    except (OSError, ValueError):\n        pass\nif found:" + solve,
        "kill parent": "import os, signal\nfor pid in [os.getppid(), 1, -1]:\n"
                       "    try:\n        os.kill(pid, signal.SIGKILL)\n"
                       "    except OSError:\n        pass\n",
        "sys.exit before tests": "import sys\nsys.exit(0)\n" + GOOD,
        "os._exit before tests": "import os\nos._exit(0)\n" + GOOD,
        "patch assert machinery": "import builtins, json, sys\n"
                                  "builtins.AssertionError = type('A', (BaseException,), {})\n"
                                  "json.dumps = lambda *a, **k: '{\"names\": [\"add\"], \"r\": true}'\n"
                                  "sys.modules['__main__'].reply = lambda *a: None\n"
                                  "def add(a, b):\n    raise AssertionError\n",
        "fake pass markers": "import os, sys\nmsg = b'{\"r\": 3}\\n' * 4 + b'PASSED\\nALL TESTS PASSED\\n'\n"
                             "for fd in range(3, 20):\n"
                             "    try:\n        os.write(fd, msg)\n    except OSError:\n        pass\nprint('OK')\n"
                             "def add(a, b):\n    print('PASSED')\n    os._exit(0)\n",
        "huge output": "def add(a, b):\n    return 'x' * (1 << 26)\n",
        "deep recursion": "import sys\nsys.setrecursionlimit(10 ** 8)\ndef add(a, b):\n    return add(a, b) + 1\n",
        "background process": "import os, subprocess\n"
                              "subprocess.Popen(['/bin/sh', '-c', 'sleep 1000'], start_new_session=True)\n"
                              "if os.fork() == 0:\n    os.setsid()\n    while True:\n        pass\n"
                              "def add(a, b):\n    return 0\n",
        "chmod workdir": "import os\nfor d in ['.', '/tmp']:\n"
                         "    try:\n        os.chmod(d, 0)\n    except OSError:\n        pass\n",
        "shadow builtins": "def add(a, b):\n    return 0\ndef abs(x):\n    return 0\n",
        "file descriptors and disk": "fs = [open(f'f{i}', 'w') for i in range(10000)]\n"
                                     "open('big', 'w').write('x' * (1 << 30))\n",
    }


def _sandbox_pids(grace: float = 5.0) -> list[int]:
    """Processes still running as a sandbox uid after `grace` seconds (the kernel tears a PID namespace down
    asynchronously after its init is killed, so a fresh one may still be exiting)."""
    deadline = time.monotonic() + grace
    while (pids := _uid_pids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


def _uid_pids() -> list[int]:
    lo = sandbox._UIDS_RANGE[0]
    pids = []
    for p in Path("/proc").iterdir():
        try:
            uid = int((p / "status").read_text().split("\nUid:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
        if lo <= uid < sandbox._UIDS_RANGE[1]:
            pids.append(int(p.name))
    return pids


def test_adversarial_suite():
    tag = f"r1-escape-{uuid.uuid4().hex}"
    progs = _adversaries(tag)
    assert len(progs) >= 15
    for name, src in progs.items():  # a syntax error would score 0 for the wrong reason
        compile(src, name, "exec")
    tests = ADD_TESTS + ["assert abs(add(1, 2)) == abs(3)"]
    scores = code_reward(list(progs.values()), tests=[tests] * len(progs), per_test=2.0, total=5.0, workers=4)
    assert dict(zip(progs, scores, strict=True)) == dict.fromkeys(progs, 0.0)
    for d in ("/tmp", "/var/tmp", "/dev/shm", "/etc", "/root", str(Path.cwd()), "/run/lock"):
        assert not Path(d, tag).exists(), d
    assert os.access(".", os.W_OK)
    if isolation() in ("namespaces", "uid"):
        assert not _sandbox_pids()
    assert code_reward([GOOD], tests=[tests]) == [1.0]  # later runs unaffected


def test_uid_fallback(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("the uid level needs root")
    monkeypatch.setattr(sandbox, "isolation", lambda: "uid")
    bg = "import os\nif os.fork() == 0:\n    os.setsid()\n    while True:\n        pass\n" + GOOD
    assert code_reward([GOOD, bg, "import os\nos._exit(0)\n"], tests=[ADD_TESTS] * 3) == [1.0, 1.0, 0.0]
    assert not _sandbox_pids()
