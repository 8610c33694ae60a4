"""Sans-IO: the authentication handshake of ``multiprocessing.connection``.

``Listener.accept()`` and ``Client()`` authenticate both ways with an HMAC challenge
and response over a shared *authkey*, each message one frame of the ordinary framing.
This module builds and checks those messages and moves no bytes; ``_remote.handshake`` sends
and receives them. The exchange, as seen by the side that challenges::

    challenger                                 answerer
    b"#CHALLENGE#" + MESSAGE        ->
                                    <-         RESPONSE = mac(authkey, MESSAGE)
    b"#WELCOME#" or b"#FAILURE#"    ->

A connection runs it twice: the listening side challenges first, then answers the
connecting side's challenge. Every handshake message is read with a limit of
:data:`MESSAGE_LIMIT` bytes.

Two versions of the messages are in use, and they interoperate:

* **md5 only** (Python 3.11 and older). MESSAGE is 20 random bytes; RESPONSE is the raw
  16-byte HMAC-MD5 of MESSAGE.
* **negotiated digest** (Python 3.12 and newer). MESSAGE is ``b"{sha256}"`` followed by
  40 random bytes, and RESPONSE names its digest the same way:
  ``b"{sha256}" + HMAC-SHA256(authkey, MESSAGE)``, the MAC taken over the whole
  MESSAGE, prefix included. An answerer picks the digest the challenge names; a
  20-byte challenge can only come from an md5-only challenger and gets a raw HMAC-MD5.
  A challenger accepts a response in any digest of :data:`ALLOWED_DIGESTS`, and a
  16-byte response without a prefix as HMAC-MD5: that is what an md5-only answerer
  sends, whatever the challenge looks like.

asyncmp speaks the newer version on every Python (the ``hmac`` module has all of
these digests everywhere), so it authenticates stdlib peers of any version.
"""

from __future__ import annotations

import hmac
import secrets
from multiprocessing import AuthenticationError

__all__ = (
    "ALLOWED_DIGESTS",
    "CHALLENGE",
    "FAILURE",
    "MESSAGE_LIMIT",
    "WELCOME",
    "answer_challenge",
    "check_verdict",
    "make_challenge",
    "verdict",
    "verify_response",
)

CHALLENGE = b"#CHALLENGE#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"
#: The longest handshake message read; the stdlib reads no more either.
MESSAGE_LIMIT = 256
#: The digests a response may use, and a challenge may name.
ALLOWED_DIGESTS = frozenset({"md5", "sha256", "sha384", "sha3_256", "sha3_384"})
#: The digest asyncmp's challenges name.
DEFAULT_DIGEST = "sha256"
#: Random bytes in a challenge of asyncmp's (and of the stdlib's since 3.12).
NONCE_LENGTH = 40
#: An md5-only challenger's MESSAGE is this long; a negotiated one is always longer.
_LEGACY_CHALLENGE_LENGTH = 20
#: An md5-only answerer's RESPONSE: a raw HMAC-MD5.
_MD5_LENGTH = 16
#: ``{`` + the longest digest name + ``}``.
_MAX_PREFIX = 2 + max(len(name) for name in ALLOWED_DIGESTS)


def _mac(authkey: bytes, message: bytes, digest: str) -> bytes:
    return hmac.new(authkey, message, digest).digest()


def _split_prefix(data: bytes) -> tuple[str, bytes] | None:
    """``b"{name}rest"`` -> ``(name, rest)`` when *name* is an allowed digest, else None."""
    if not data.startswith(b"{"):
        return None
    end = data.find(b"}", 1, _MAX_PREFIX)
    if end < 0:
        return None
    name = data[1:end].decode("ascii", "replace")
    if name not in ALLOWED_DIGESTS:
        return None
    return name, data[end + 1 :]


def make_challenge(digest: str = DEFAULT_DIGEST, nonce: bytes | None = None) -> tuple[bytes, bytes]:
    """Return ``(frame, message)``: the challenge to send, and the MESSAGE to verify with.

    *nonce* defaults to :data:`NONCE_LENGTH` fresh random bytes.
    """
    if digest not in ALLOWED_DIGESTS:
        raise ValueError(f"digest {digest!r} is not one of {sorted(ALLOWED_DIGESTS)}")
    if nonce is None:
        nonce = secrets.token_bytes(NONCE_LENGTH)
    message = b"{" + digest.encode("ascii") + b"}" + nonce
    if len(message) <= _LEGACY_CHALLENGE_LENGTH:
        # A peer would take it for an md5-only challenge.
        raise ValueError(f"challenge message of {len(message)} bytes is too short")
    return CHALLENGE + message, message


def verify_response(authkey: bytes, message: bytes, response: bytes) -> None:
    """Check the answer to our challenge *message*.

    :raises multiprocessing.AuthenticationError: the response names no allowed digest,
        or its MAC is wrong (a different authkey).
    """
    if len(response) == _MD5_LENGTH:
        digest, mac = "md5", response  # an md5-only answerer
    else:
        parsed = _split_prefix(response)
        if parsed is None:
            raise AuthenticationError(
                f"response of {len(response)} bytes is neither a raw HMAC-MD5 nor "
                "prefixed with an allowed digest"
            )
        digest, mac = parsed
    try:
        expected = _mac(authkey, message, digest)
    except ValueError:  # the digest is missing here (md5 in FIPS mode)
        raise AuthenticationError(f"digest {digest!r} is not available") from None
    if len(mac) != len(expected) or not hmac.compare_digest(mac, expected):
        raise AuthenticationError("digest received was wrong")


def verdict(ok: bool) -> bytes:
    """The frame that ends a challenge: ``#WELCOME#`` or ``#FAILURE#``."""
    return WELCOME if ok else FAILURE


def answer_challenge(authkey: bytes, frame: bytes) -> bytes:
    """Return the response to the challenge *frame* the peer sent.

    :raises multiprocessing.AuthenticationError: *frame* is not a challenge, is too
        short, or names a digest that is not allowed.
    """
    if not frame.startswith(CHALLENGE):
        raise AuthenticationError(f"expected a challenge, got {len(frame)} other bytes")
    message = frame[len(CHALLENGE) :]
    if len(message) < _LEGACY_CHALLENGE_LENGTH:
        raise AuthenticationError(f"challenge of {len(message)} bytes is too short")
    if len(message) == _LEGACY_CHALLENGE_LENGTH:
        try:
            return _mac(authkey, message, "md5")  # an md5-only challenger
        except ValueError:
            # No md5 here (FIPS mode): answer in the newer form. An md5-only peer
            # rejects it, but nothing else would pass either.
            digest = DEFAULT_DIGEST
    else:
        parsed = _split_prefix(message)
        if parsed is None:
            raise AuthenticationError("challenge names no allowed digest")
        digest = parsed[0]
    try:
        mac = _mac(authkey, message, digest)
    except ValueError:
        raise AuthenticationError(f"digest {digest!r} is not available") from None
    return b"{" + digest.encode("ascii") + b"}" + mac


def check_verdict(frame: bytes) -> None:
    """:raises multiprocessing.AuthenticationError: unless *frame* is ``#WELCOME#``."""
    if frame != WELCOME:
        raise AuthenticationError("digest sent was rejected")
