"""Sessions for testing, linting, type-checking, docs and benchmarks: ``nox -l`` lists them.

Dependencies come from the ``[dependency-groups]`` of pyproject.toml, Python versions from its
classifiers. An interpreter that is not on PATH is skipped, not an error, on CI too.
"""

from __future__ import annotations

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


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite; each async test runs on asyncio, uvloop and trio."""
    session.install(*group("test"), ".")
    junit = session.env_dir / "junit.xml"  # read by .ci/run for its summary
    session.run("pytest", f"--junitxml={junit}", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """Minutes of producers killed at random and calls cancelled at random, with sync and async
    consumers; fails unless only the documented items were lost. Not run by default or on CI.
    Arguments after -- go to tests/faults/soak.py (e.g. --duration 600 --backend trio)."""
    session.install(*group("test"), ".")
    session.run("python", "tests/faults/soak.py", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """CPU-bound workers stream results to an async consumer; a heartbeat shows the loop never
    stalled. Arguments after -- go to examples/demo.py (e.g. --backend trio)."""
    session.install(".", *group("examples"))
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session
def examples(session: nox.Session) -> None:
    """Run every example on each backend and start method where it applies, and check what it
    prints; arguments after -- name the examples to run (e.g. service pipeline)."""
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
    """Type-check src and tests with mypy (strict), src as macOS and Windows see it, and the API.

    The API's types are checked as a user's program sees them: tests/typecheck/check_api.py."""
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
    # benchmarks/results/latest.json -> docs/images/bench.png, shown on the performance page.
    session.run("python", "benchmarks/chart.py")
