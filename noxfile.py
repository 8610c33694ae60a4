"""Sessions for testing, linting, type-checking, docs and benchmarks: ``nox -l`` lists them.

Dependencies come from the ``[dependency-groups]`` of pyproject.toml, Python versions from its
classifiers. An interpreter that is not on PATH is skipped, not an error, on CI too.
"""

from __future__ import annotations

import multiprocessing
import sys

import nox

nox.needs_version = ">=2025.10.16"  # dependency_groups, download_python, Session.env_dir
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = False
nox.options.download_python = "never"
nox.options.sessions = ["lint", "typecheck", "tests"]

PYPROJECT = nox.project.load_toml("pyproject.toml")
# 3.14 is classified but not yet tested: the machines that run these sessions lack it.
PYTHONS = [v for v in nox.project.python_versions(PYPROJECT) if v != "3.14"]
BACKENDS = ["asyncio", "trio"] if sys.platform == "win32" else ["asyncio", "uvloop", "trio"]
START_METHODS = [
    m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()
]


def group(name: str) -> tuple[str, ...]:
    return nox.project.dependency_groups(PYPROJECT, name)


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite; each async test runs on asyncio, uvloop and trio."""
    session.install(*group("test"), ".")
    junit = session.env_dir / "junit.xml"  # read by .ci/run for its summary
    session.run("pytest", f"--junitxml={junit}", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Talk to a worker process and show that the event loop kept running meanwhile."""
    session.install(".")
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session
def examples(session: nox.Session) -> None:
    """Run the examples on every event-loop backend and start method."""
    session.install(".", *group("backends"))
    for backend in BACKENDS:
        for method in START_METHODS:
            session.run(
                "python", "examples/seed_pipe.py", "--backend", backend, "--start-method", method
            )


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff."""
    session.install(*group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check src and tests with mypy in strict mode."""
    session.install(*group("typecheck"))
    session.run("mypy", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation; warnings are errors."""
    session.install(".", *group("docs"))
    # The theme prints a banner about its future unless told not to.
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks; arguments after -- go to benchmarks/run.py."""
    session.install(".", *group("bench"))
    session.run("python", "benchmarks/run.py", *session.posargs)
