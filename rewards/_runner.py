"""Runs inside the sandbox, after rewards/wire.py, as `python -S -I -c <wire + this> <conf>`; never imported.

First it confines itself as rewards/sandbox.py asks in `conf` (JSON): resource limits, then chroot into the
private root (the namespaces level), then the unprivileged uid; only then does it read the program.

stdin: an 8-byte length, a JSON header {"code", "mode"}, then either the program's input ("stdio") or
call requests, one JSON line each ("rpc"). In rpc mode the program's own stdin/stdout are /dev/null and
this loop answers each request with the encoded return value or the exception: the harness in the parent
decides pass or fail from those values, so nothing the program prints, exits with, or patches counts.
"""

import json  # noqa: F401 - also bound by wire.py above it
import os
import sys


def _read_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(0, n - len(buf))
        if not chunk:
            sys.exit(3)
        buf += chunk
    return buf


def _confine(conf):
    import resource

    for res, value in conf["rlimits"]:
        resource.setrlimit(res, (value, value))
    if conf["root"]:
        os.chroot(conf["root"])
        os.chdir("/tmp")
        os.environ.pop("PWD", None)  # the trainer's directory, as /bin/sh passed it on
    if conf["no_new_privs"]:  # no setuid binary may give the uid back (the chroot has only nosuid mounts)
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            sys.exit(4)
    if conf["uid"] is not None:
        os.setgroups([])
        os.setresgid(conf["uid"], conf["uid"], conf["uid"])
        os.setresuid(conf["uid"], conf["uid"], conf["uid"])
    sys.argv = ["solution.py"]


def _main():
    _confine(json.loads(sys.argv[1]))
    meta = json.loads(_read_exact(int.from_bytes(_read_exact(8), "little")))
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    if meta["mode"] == "stdio":
        exec(compile(meta["code"], "solution.py", "exec"), ns)
        return
    rin, rout = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)

    def reply(obj):
        rout.write(json.dumps(obj).encode() + b"\n")
        rout.flush()

    try:
        exec(compile(meta["code"], "solution.py", "exec"), ns)
    except BaseException as e:  # noqa: BLE001 - SystemExit included: the tests never ran
        reply({"e": [type(e).__name__, str(e)[:300]]})
        return
    reply({"names": [k for k, v in ns.items() if callable(v) and not k.startswith("__")]})
    for line in rin:
        req = json.loads(line)
        try:
            out = {"r": enc(ns[req["f"]](*dec(req["a"]), **dec(req["k"])))}  # noqa: F821 - from wire.py
        except BaseException as e:  # noqa: BLE001
            out = {"e": [type(e).__name__, str(e)[:300]]}
        try:
            reply(out)
        except ValueError as e:  # e.g. an int too long to print
            reply({"e": [type(e).__name__, str(e)[:300]]})


_main()
