"""Sessions for testing, linting, type-checking, docs and benchmarks: ``nox -l`` lists them.

Dependencies come from the ``[dependency-groups]`` of pyproject.toml, Python versions from its
classifiers. An interpreter that is not on PATH is skipped, not an error, on CI too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import nox

nox.needs_version = ">=2025.10.16"  # dependency_groups, download_python, Session.env_dir
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = False
nox.options.download_python = "never"
nox.options.sessions = ["lint", "typecheck", "tests"]

PYPROJECT = nox.project.load_toml("pyproject.toml")
# Every classified version; one that is not installed is skipped (see the options above).
PYTHONS = nox.project.python_versions(PYPROJECT)


def group(name: str) -> tuple[str, ...]:
    return nox.project.dependency_groups(PYPROJECT, name)


_HINTED = False


def hint_missing_pythons(session: nox.Session) -> None:
    """Once per run: name the classified Pythons that don't run here, and how to add them.

    nox itself only says "Python interpreter 3.12 not found". A pyenv shim is on PATH even
    for a version pyenv is not told to use, and fails when run, so each one is tried.
    """
    global _HINTED
    if _HINTED or sys.platform == "win32":  # Windows finds its Pythons through `py`
        return
    _HINTED = True
    missing = [v for v in PYTHONS if not runs(f"python{v}")]
    if missing:
        session.warn(
            f"Python {', '.join(missing)} not on PATH: nox skips those sessions. To run them"
            " with pyenv's interpreters, list the versions: `pyenv global 3.11.7 3.10.13"
            " 3.12.1` (or `pyenv shell ...` for this terminal only); `pyenv versions` shows"
            " what is installed."
        )


def runs(program: str) -> bool:
    path = shutil.which(program)
    if path is None:
        return False
    try:
        subprocess.run([path, "-c", ""], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite; each async test runs on asyncio, uvloop and trio."""
    hint_missing_pythons(session)
    session.install(*group("test"), ".")
    junit = session.env_dir / "junit.xml"  # read by .ci/run for its summary
    # One worker process per core, at most four: the tests must hold on a busy machine
    # anyway, and they spend most of their time waiting on child processes.
    # A test file to one worker: tests that check machine-wide state (test_shared's
    # segments in /dev/shm) then never see another worker's.
    parallel = ("-n", "auto", "--maxprocesses", "4", "--dist", "loadfile")
    session.run("pytest", *parallel, f"--junitxml={junit}", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """Kill producers and cancel calls at random for minutes; only documented losses pass.

    Sync and async consumers take part. Not run by default or on CI. Arguments after -- go to
    tests/faults/soak.py (e.g. --duration 600 --backend trio).
    """
    session.install(*group("test"), ".")
    session.run("python", "tests/faults/soak.py", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Show workers streaming results to an async consumer whose loop never stalls.

    The workers are CPU-bound; a heartbeat shows the loop keeps running. Arguments after -- go
    to examples/demo.py (e.g. --backend trio).
    """
    session.install(".", *group("examples"))
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session
def examples(session: nox.Session) -> None:
    """Run every example on each backend and start method, and check what it prints.

    Each runs where it applies; arguments after -- name the examples to run (e.g. service
    pipeline).
    """
    session.install(".", *group("examples"))
    session.run("python", "examples/_check.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff."""
    session.install(*group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check src, tests and the public API with mypy (strict), on every platform.

    src is also checked as macOS and Windows see it, and tests/typecheck/check_api.py as a
    user's program sees the API.
    """
    session.install(*group("typecheck"))
    session.run("mypy", *session.posargs)
    # The platform checks in src keep each platform's branches honest.
    for platform in ("darwin", "win32"):
        session.run("mypy", "--platform", platform, "src")
    # assert_type lines, and errors that must stay errors (an unused ignore fails), on the
    # oldest Python and on one where TypeVar defaults come from typing itself.
    for version in ("3.10", "3.13"):
        session.run("mypy", "--python-version", version, "tests/typecheck/check_api.py")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation; warnings are errors."""
    session.install(".", *group("docs"))
    # The theme prints a banner about its future unless told not to.
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks and chart them; arguments after -- go to benchmarks/run.py."""
    session.install(".", *group("bench"))
    session.run("python", "benchmarks/run.py", *session.posargs)
    if "--no-save" in session.posargs or "--output" in session.posargs:
        session.log("results not in benchmarks/results: the docs' chart is left as it was")
        return
    # benchmarks/results/latest.json -> docs/images/bench.png (the summary) and
    # docs/images/bench/<id>.png (a chart per benchmark), shown on the performance page.
    session.run("python", "benchmarks/chart.py")
