"""A pre-imported process that forks `atmpipe` CLI runs on request (tests/reliability_helpers.Zygote).

The crash tests kill many real processes; importing torch and transformers for each would cost seconds.
This process imports them once and never runs torch itself (so no OpenMP pool exists to be forked), then
forks one child per request; the child runs the CLI as `python -m atmpipe` would. Protocol: one JSON
request per line on stdin, one JSON reply per line on stdout.
"""

import json
import os
import sys
import traceback

import atmpipe.cli  # noqa: F401  (the heavy imports, once)
import atmpipe.eval.run  # noqa: F401
import atmpipe.harvest  # noqa: F401
import atmpipe.inspect.run  # noqa: F401
import atmpipe.train  # noqa: F401


def child(request: dict) -> None:
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group: a signal meant for it never reaches the zygote
        os.chdir(request["cwd"])
        os.environ.update(request.get("env", {}))
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.argv = ["atmpipe", *request["argv"]]
        try:
            atmpipe.cli.app(request["argv"], prog_name="atmpipe")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "run":
            pid = os.fork()
            if pid == 0:
                child(request)
            reply = {"pid": pid}
        elif request["op"] == "wait":
            done, status = os.waitpid(request["pid"], os.WNOHANG if request.get("nohang") else 0)
            reply = {"code": os.waitstatus_to_exitcode(status) if done else None}  # None: still running
        else:
            reply = {"error": f"unknown op {request['op']!r}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
