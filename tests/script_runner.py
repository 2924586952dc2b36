"""Run many script invocations as separate processes without paying for an interpreter start and a torch import in
each (2-5 s apiece on two cores): this process imports the libraries the scripts use once, then forks one child per
job, and the child runs the script as `__main__` with the job's argv, working directory and environment, its stdout
and stderr going to files. What a user would see is what a job records: the exit status Python would give (a
string exit code printed to stderr and status 1; an uncaught exception's traceback on stderr and status 1).

    PYTHONPATH=<repository root> python tests/script_runner.py jobs.json results.json

jobs.json is a list of {"id", "script" (a path) or "module" (for -m), "argv", "cwd", "env", "unset", "stdout",
"stderr", "timeout", "no_model_load"}; results.json gets {id: {"returncode", "seconds"}}. With "no_model_load" a
child that starts loading weights (our model's or peft's from_pretrained) stops there with ModelLoadAttempted, an
exception no script catches, so a check that should come first shows as a traceback. Used by
tests/test_bad_inputs.py. The parent runs no torch operation before it forks, so no thread pool is copied into a
child half-alive.
"""
import json
import os
import runpy
import signal
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELOAD = ("torch", "transformers", "transformers.cache_utils", "peft", "openai", "safetensors", "tqdm",
           "medextract.model_files", "medextract.inference", "medextract.cli", "medextract.checkpoints",
           "medextract.qlora", "medextract.training", "medextract.distributed", "data_helper", "evaluate", "train",
           "merge_params", "predict", "test_openai", "test_qwen", "qwen1_8.make_tiny", "qwen1_8.modeling_qwen",
           "qwen1_8.tokenization_qwen", "export_qwen2")
WORKERS = 2  # children at a time: most jobs stop in milliseconds, a few load a tokenizer


class ModelLoadAttempted(BaseException):
    """Raised where a job that must stop before any weights load goes to load them (BaseException: no script's
    `except Exception`-style handler takes it for a bad file)."""


def forbid_model_loads() -> None:
    from peft import PeftModel

    from qwen1_8.modeling_qwen import QWenLMHeadModel

    def refuse(cls, *args, **kwargs):
        raise ModelLoadAttempted(f"{cls.__name__}.from_pretrained was called")

    QWenLMHeadModel.from_pretrained = classmethod(refuse)
    PeftModel.from_pretrained = classmethod(refuse)


def child(job: dict) -> None:
    """Become the job's process; never returns."""
    code = 1
    try:
        os.chdir(job["cwd"])
        for stream, path in ((1, job["stdout"]), (2, job["stderr"])):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, stream)
            os.close(fd)
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        os.environ.update(job.get("env", {}))
        for name in job.get("unset", []):
            os.environ.pop(name, None)
        if job.get("no_model_load"):
            forbid_model_loads()
        sys.argv = [job.get("script") or job["module"], *job["argv"]]
        try:
            if job.get("module"):
                runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(job["script"], run_name="__main__")
            code = 0
        except SystemExit as e:  # as the interpreter treats it
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # what the interpreter does with any uncaught exception
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    """Preload, then run the jobs WORKERS at a time, killing any that outlives its timeout."""
    jobs_file, results_file = map(os.path.abspath, sys.argv[1:3])
    os.chdir(ROOT)
    import utils

    utils.silence_library_deprecations()  # as each script does first: the preload would otherwise print them
    for name in PRELOAD:
        __import__(name)
    with open(jobs_file, encoding="utf-8") as f:
        jobs = json.load(f)
    results, running, queue = {}, {}, list(jobs)
    while queue or running:
        while queue and len(running) < WORKERS:
            job = queue.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(job)
            running[pid] = (job, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for other, (job, start) in running.items():
                if time.monotonic() - start > job.get("timeout", 120):
                    os.kill(other, signal.SIGKILL)
            time.sleep(0.005)
            continue
        job, start = running.pop(pid)
        results[job["id"]] = {"returncode": os.waitstatus_to_exitcode(status),
                              "seconds": round(time.monotonic() - start, 3)}
    with open(results_file, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
