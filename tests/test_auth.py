"""The handshake messages of ``_remote.auth``, without I/O: formats, both versions, bad input.

The expected bytes are computed here from ``hmac`` directly, following the stdlib's
handshake (md5-only before Python 3.12, a negotiated digest since). Interoperation with
real stdlib peers of both kinds is tested in ``test_remote.py``.
"""

from __future__ import annotations

import hmac
import multiprocessing.connection
import socket
import threading
from multiprocessing import AuthenticationError

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncmp._remote import auth as _auth
from asyncmp._remote.auth import (
    CHALLENGE,
    FAILURE,
    WELCOME,
    answer_challenge,
    check_verdict,
    make_challenge,
    verify_response,
)

KEY = b"the shared secret"
NONCE = bytes(range(40))


def mac(key: bytes, message: bytes, digest: str) -> bytes:
    return hmac.new(key, message, digest).digest()


# --- challenges ---------------------------------------------------------------------------


def test_challenge_names_sha256_and_carries_40_random_bytes() -> None:
    frame, message = make_challenge()
    assert frame == CHALLENGE + message
    assert message.startswith(b"{sha256}")
    assert len(message) == len(b"{sha256}") + 40
    assert make_challenge()[1] != message  # fresh randomness every time


def test_challenge_with_given_digest_and_nonce() -> None:
    frame, message = make_challenge("sha3_384", NONCE)
    assert message == b"{sha3_384}" + NONCE
    assert frame == b"#CHALLENGE#{sha3_384}" + NONCE


def test_challenge_refuses_unknown_digest_and_short_nonce() -> None:
    with pytest.raises(ValueError, match="sha1"):
        make_challenge("sha1")
    with pytest.raises(ValueError, match="too short"):
        make_challenge("md5", b"x" * 10)  # 15 bytes: would read as an md5-only challenge


# --- answering ----------------------------------------------------------------------------


def test_answer_md5_only_challenge_with_raw_hmac_md5() -> None:
    message = b"m" * 20  # what Python 3.11 and older send
    assert answer_challenge(KEY, CHALLENGE + message) == mac(KEY, message, "md5")


@pytest.mark.parametrize("digest", sorted(_auth.ALLOWED_DIGESTS))
def test_answer_negotiated_challenge_in_its_digest(digest: str) -> None:
    message = b"{" + digest.encode() + b"}" + NONCE
    response = answer_challenge(KEY, CHALLENGE + message)
    # The MAC covers the whole message, prefix included, and the response names it.
    assert response == b"{" + digest.encode() + b"}" + mac(KEY, message, digest)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (b"#WELCOME#", "expected a challenge"),
        (b"hello" + NONCE, "expected a challenge"),
        (CHALLENGE + b"x" * 19, "too short"),
        (CHALLENGE + b"{sha1}" + NONCE, "no allowed digest"),
        (CHALLENGE + b"{sha256" + NONCE, "no allowed digest"),
        (CHALLENGE + NONCE, "no allowed digest"),  # 40 bytes without a prefix
    ],
)
def test_answer_rejects_what_is_not_a_valid_challenge(frame: bytes, match: str) -> None:
    with pytest.raises(AuthenticationError, match=match):
        answer_challenge(KEY, frame)


# --- verifying ----------------------------------------------------------------------------


def test_verify_accepts_the_negotiated_response() -> None:
    _, message = make_challenge(nonce=NONCE)
    verify_response(KEY, message, b"{sha256}" + mac(KEY, message, "sha256"))


def test_verify_accepts_a_raw_md5_response_from_an_md5_only_peer() -> None:
    # An md5-only answerer MACs the whole prefixed message with md5, unprefixed.
    _, message = make_challenge(nonce=NONCE)
    verify_response(KEY, message, mac(KEY, message, "md5"))


def test_verify_accepts_any_allowed_digest() -> None:
    _, message = make_challenge(nonce=NONCE)
    verify_response(KEY, message, b"{sha384}" + mac(KEY, message, "sha384"))


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"{sha256}" + mac(b"another key", b"{sha256}" + NONCE, "sha256"), id="key"),
        pytest.param(mac(b"another key", b"{sha256}" + NONCE, "md5"), id="md5-key"),
        pytest.param(b"{sha256}" + mac(KEY, NONCE, "sha256"), id="prefix-not-covered"),
        pytest.param(b"{sha256}" + mac(KEY, b"{sha256}" + NONCE, "sha384"), id="length"),
        pytest.param(b"{sha1}" + mac(KEY, b"{sha256}" + NONCE, "sha1"), id="sha1"),
        pytest.param(mac(KEY, b"{sha256}" + NONCE, "sha1"), id="raw-sha1"),
        pytest.param(b"", id="empty"),
        pytest.param(b"x" * 256, id="junk"),
    ],
)
def test_verify_rejects_wrong_responses(response: bytes) -> None:
    with pytest.raises(AuthenticationError):
        verify_response(KEY, b"{sha256}" + NONCE, response)


def test_verdicts() -> None:
    check_verdict(WELCOME)
    for frame in (FAILURE, b"", WELCOME + b"!"):
        with pytest.raises(AuthenticationError, match="rejected"):
            check_verdict(frame)
    assert _auth.verdict(True) == WELCOME
    assert _auth.verdict(False) == FAILURE


@given(
    key=st.binary(min_size=1, max_size=80),
    other=st.binary(min_size=1, max_size=80),
    digest=st.sampled_from(sorted(_auth.ALLOWED_DIGESTS)),
    nonce=st.binary(min_size=20, max_size=60),
)
def test_round_trip_succeeds_only_with_the_same_key(
    key: bytes, other: bytes, digest: str, nonce: bytes
) -> None:
    frame, message = make_challenge(digest, nonce)
    verify_response(key, message, answer_challenge(key, frame))
    if mac(other, b"", digest) != mac(key, b"", digest):
        # (HMAC pads short keys with zeros: b"k" and b"k\0" are the same key.)
        with pytest.raises(AuthenticationError):
            verify_response(key, message, answer_challenge(other, frame))


# --- against this Python's own stdlib functions ----------------------------------------------


def _stdlib_exchange(
    ours: str, key_ours: bytes, key_theirs: bytes
) -> tuple[BaseException | None, BaseException | None]:
    """Run one challenge between ``_remote.auth`` and the stdlib over a socketpair.

    ``ours="challenger"``: we challenge, the stdlib's ``answer_challenge`` answers;
    ``ours="answerer"``: the stdlib's ``deliver_challenge`` challenges, we answer.
    Returns (our error, the stdlib's error).
    """
    a, b = socket.socketpair()
    conn_ours = multiprocessing.connection.Connection(a.detach())
    conn_theirs = multiprocessing.connection.Connection(b.detach())
    errors: list[BaseException | None] = [None, None]

    def theirs() -> None:
        try:
            if ours == "challenger":
                multiprocessing.connection.answer_challenge(conn_theirs, key_theirs)
            else:
                multiprocessing.connection.deliver_challenge(conn_theirs, key_theirs)
        except BaseException as exc:
            errors[1] = exc

    thread = threading.Thread(target=theirs)
    thread.start()
    try:
        if ours == "challenger":
            frame, message = make_challenge()
            conn_ours.send_bytes(frame)
            try:
                verify_response(key_ours, message, conn_ours.recv_bytes(256))
            except AuthenticationError as exc:
                conn_ours.send_bytes(FAILURE)
                errors[0] = exc
            else:
                conn_ours.send_bytes(WELCOME)
        else:
            conn_ours.send_bytes(answer_challenge(key_ours, conn_ours.recv_bytes(256)))
            try:
                check_verdict(conn_ours.recv_bytes(256))
            except AuthenticationError as exc:
                errors[0] = exc
    finally:
        thread.join(10)
        conn_ours.close()
        conn_theirs.close()
    return errors[0], errors[1]


@pytest.mark.parametrize("ours", ["challenger", "answerer"])
def test_against_this_pythons_stdlib(ours: str) -> None:
    assert _stdlib_exchange(ours, KEY, KEY) == (None, None)
    ours_error, theirs_error = _stdlib_exchange(ours, KEY, b"another key")
    assert isinstance(ours_error, AuthenticationError)
    assert isinstance(theirs_error, AuthenticationError)
