#!/usr/bin/env python3
"""Fault-injecting SMTP submission server for hikyaku's end-to-end tests.

hikyaku talks to a real submission service (typically Gmail) and has to cope
with what such a service does: STARTTLS or implicit TLS, AUTH before MAIL,
rejected credentials, per-recipient rejections, transient 4xx failures,
connections that die mid-transaction, slow replies and a daily sending limit
that suddenly turns every new transaction away.  This server reproduces those
behaviours on demand, with Gmail's reply texts, so that the end-to-end tests
can drive the compiled binary against it and check exactly what was delivered.

The server listens on 127.0.0.1 on a port chosen by the OS (or the one given
with ``--port``, so that a test can stop the server and start it again where
the client expects it) and runs until it receives SIGTERM or SIGINT, then
exits with status 0.

Command line
------------
--ready-file PATH     (required) once listening, JSON ``{"port": N, "ca": P}``
                      is written to PATH atomically (temp file + rename).  P is
                      the absolute path of the CA certificate (PEM) that signed
                      the server certificate, or null with ``--tls none``.
--record PATH         (required) JSON-lines log of accepted messages, created
                      (empty) at start-up and appended to, one line per message
                      accepted after DATA, flushed and fsync'ed before the 250
                      reply is sent::

                          {"mail_from": str, "rcpt_tos": [str],
                           "data_b64": base64 of the raw message bytes,
                           "received_at": unix time at the end of DATA,
                           "n": running count of accepted messages, from 1,
                           "helo": the client's EHLO/HELO argument,
                           "replied": false when the connection was then
                                      dropped without a reply,
                           "user": the user the session logged in as, or null,
                           "pipelined": whether RCPT and DATA had arrived
                                        before MAIL FROM was answered}

--tls starttls|tls|none
                      starttls (default): STARTTLS is required before anything
                      but EHLO/NOOP/QUIT.  tls: implicit TLS from the first
                      byte (like port 465).  none: plain text.  For starttls
                      and tls a CA and a certificate for ``localhost`` and
                      ``127.0.0.1`` are generated with trustme, and the CA is
                      written to ``ca.pem`` next to the ready file.
--user U --password P  require AUTH (PLAIN or LOGIN) with these credentials
--account U:P         (repeatable) also accept AUTH for user U with password
                      P: several accounts on one server, as on Gmail's.
--pause-user U=N      (repeatable) once user U had N messages accepted, every
                      further MAIL FROM of U gets the pause reply (a quota
                      reached by one account while the others go on).
--oauth-token T       also accept AUTH XOAUTH2 for --user with bearer token T
                      before MAIL.  With starttls, AUTH is only offered and
                      accepted after STARTTLS.  Wrong credentials get Gmail's
                      ``535 5.7.8 Username and Password not accepted. ...``.
--reject RCPT=REPLY   (repeatable) answer ``RCPT TO:<RCPT>`` (case-insensitive)
                      with REPLY verbatim, e.g. ``bad@example.com=550 5.1.1 ...``.
--transient-rate F    probability of answering the end of DATA with
                      ``451 4.3.0 Mail server temporarily rejected message.``
--drop-rate F         probability of closing the connection after the end of
                      DATA without sending any reply.
--store-then-drop-rate F
                      probability of storing the message (it is recorded,
                      with "replied": false) and then closing the
                      connection without a reply: the lost reply of RFC 1047.
--seed S              seed of the random generator shared by the rates
                      (default 0).  One number is drawn per completed DATA:
                      below drop-rate means drop, below drop-rate +
                      store-then-drop-rate means store then drop, below
                      those + transient-rate means 451, otherwise the
                      message is accepted.  The rates add up to at most 1.
--pause-after N       once N messages have been accepted in total, every
                      further MAIL FROM gets the pause reply.  The check is
                      made at MAIL FROM; it is repeated at the end of DATA so
                      that transactions already past MAIL FROM on concurrent
                      connections cannot push the total above N.
--pause-reply REPLY   reply used by --pause-after (default: Gmail's
                      ``550 5.4.5 Daily user sending limit exceeded. ...``).
--delay-ms D          wait D milliseconds after the end of DATA before
                      answering it (or dropping the connection).
--port N              listen on port N instead of one chosen by the OS.
--size-limit N        advertise SIZE N in the EHLO reply and refuse larger
                      messages with 552 (default 64 MiB).
--no-pipelining       do not offer PIPELINING (offered by default, as Gmail
                      does).
--verbose             log the SMTP conversation to stderr.

Accepted messages get ``250 2.0.0 OK <n> - gsmtp``.  Messages up to 64 MiB
(or ``--size-limit``) are accepted (SIZE is advertised).

A dropped connection is aborted at the TCP level (no TLS close_notify, no
reply bytes): the DATA hook calls ``abort()`` on the session's transport and
returns a reply that aiosmtpd then tries to write to the already aborted
transport, where asyncio discards it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import random
import signal
import ssl
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import (MISSING, SMTP, AuthResult, Envelope, LoginPassword,
                           Session, TLSSetupException)

BAD_CREDENTIALS = (
    "535 5.7.8 Username and Password not accepted. For more information, "
    "go to https://support.google.com/mail/?p=BadCredentials"
)
DAILY_LIMIT = (
    "550 5.4.5 Daily user sending limit exceeded. For more information on "
    "Gmail sending limits go to https://support.google.com/a/answer/166852"
)
TRANSIENT = "451 4.3.0 Mail server temporarily rejected message."
DROPPED = "421 4.4.2 Connection dropped"  # never reaches the client
DATA_SIZE_LIMIT = 64 * 1024 * 1024


class FaultPlan:
    """The faults to inject, as given on the command line."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rejects: dict[str, str] = {}
        for spec in args.reject:
            rcpt, sep, reply = spec.partition("=")
            if not sep or not rcpt or not reply:
                raise ValueError(f"--reject expects RCPT=REPLY, got {spec!r}")
            self.rejects[rcpt.strip().lower()] = reply
        self.transient_rate: float = args.transient_rate
        self.drop_rate: float = args.drop_rate
        self.store_drop_rate: float = args.store_then_drop_rate
        rates = (("--transient-rate", self.transient_rate),
                 ("--drop-rate", self.drop_rate),
                 ("--store-then-drop-rate", self.store_drop_rate))
        for name, rate in rates:
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {rate}")
        if sum(rate for _, rate in rates) > 1.0:
            raise ValueError("the fault rates must not add up to more than 1")
        self.pause_after: Optional[int] = args.pause_after
        if self.pause_after is not None and self.pause_after < 0:
            raise ValueError("--pause-after must not be negative")
        self.pause_reply: str = args.pause_reply
        self.pause_users: dict[str, int] = {}
        for spec in args.pause_user:
            user, sep, count = spec.rpartition("=")
            if not sep or not user or not count.isdigit():
                raise ValueError(f"--pause-user expects USER=N, got {spec!r}")
            self.pause_users[user] = int(count)
        self.delay: float = max(args.delay_ms, 0) / 1000.0
        self.pipelining: bool = not args.no_pipelining


class Recorder:
    """Appends one durable JSON line per accepted message."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")

    def append(self, entry: dict) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _text(value: str) -> str:
    """Make a surrogate-escaped SMTP argument safe for strict JSON readers."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class FaultyHandler:
    """aiosmtpd handler implementing the fault plan.

    All hooks run on the controller's single event loop thread, so the
    counters need no locking as long as no await separates a check from the
    update it guards.
    """

    def __init__(self, plan: FaultPlan, recorder: Recorder, seed: int,
                 auth_enabled: bool, user: Optional[str] = None,
                 oauth_token: Optional[str] = None) -> None:
        self.plan = plan
        self.user = user
        self.oauth_token = oauth_token
        self.auth_enabled = auth_enabled
        self.recorder = recorder
        self.rng = random.Random(seed)
        self.accepted = 0
        self.accepted_by: dict[str, int] = {}

    def _paused(self, session: Session) -> bool:
        if (self.plan.pause_after is not None
                and self.accepted >= self.plan.pause_after):
            return True
        user = _user(session)
        cap = self.plan.pause_users.get(user or "")
        return cap is not None and self.accepted_by.get(user, 0) >= cap

    async def handle_EHLO(self, server: SMTP, session: Session,
                          envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        # With this hook aiosmtpd leaves setting host_name to the handler.
        session.host_name = hostname
        if not self.auth_enabled:
            responses = [r for r in responses
                         if not r[4:].upper().startswith("AUTH")]
        if self.plan.pipelining:
            # Gmail offers PIPELINING (RFC 2920); aiosmtpd reads pipelined
            # commands line by line from its buffer either way.
            responses = responses[:-1] + ["250-PIPELINING"] + responses[-1:]
        return responses

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        """Google's XOAUTH2: base64 of "user=U^Aauth=Bearer T^A^A" as the
        initial response; a wrong user or token is refused as Gmail does."""
        refused = AuthResult(success=False, handled=False,
                             message=BAD_CREDENTIALS)
        if self.oauth_token is None or len(args) < 2:
            return refused
        try:
            text = base64.b64decode(args[1], validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return refused
        fields = dict(part.split("=", 1) for part in text.split("\x01")
                      if "=" in part)
        if (fields.get("user") == self.user
                and fields.get("auth") == f"Bearer {self.oauth_token}"):
            return AuthResult(success=True, auth_data=LoginPassword(
                self.user.encode("utf-8"), b""))
        return refused

    async def handle_AUTH(self, server: SMTP, session: Session,
                          envelope: Envelope, args: list[str]) -> object:
        return MISSING if self.auth_enabled else "502 5.5.1 AUTH not supported"

    async def handle_MAIL(self, server: SMTP, session: Session,
                          envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        # Whether the client sent more (RCPT, DATA) before this reply: the
        # commands that follow MAIL are already in the read buffer.
        envelope.pipelined = bool(getattr(server._reader, "_buffer", b""))
        if self._paused(session):
            return self.plan.pause_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK - gsmtp"

    async def handle_RCPT(self, server: SMTP, session: Session,
                          envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        reply = self.plan.rejects.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK - gsmtp"

    async def handle_DATA(self, server: SMTP, session: Session,
                          envelope: Envelope) -> str:
        received_at = time.time()
        if self.plan.delay:
            await asyncio.sleep(self.plan.delay)
        if self._paused(session):
            return self.plan.pause_reply
        draw = self.rng.random()
        if draw < self.plan.drop_rate:
            return self._drop(server)
        store_drop = self.plan.drop_rate + self.plan.store_drop_rate
        if draw < store_drop:
            self._store(session, envelope, received_at, replied=False)
            return self._drop(server)
        if draw < store_drop + self.plan.transient_rate:
            return TRANSIENT
        n = self._store(session, envelope, received_at, replied=True)
        return f"250 2.0.0 OK {n} - gsmtp"

    @staticmethod
    def _drop(server: SMTP) -> str:
        # Abort the connection (through the TLS layer when there is one,
        # which then aborts the TCP transport without a close_notify).
        # smtp_DATA writes the returned reply afterwards; asyncio drops
        # writes to an aborted transport, so the client gets no byte.
        if server.transport is not None:
            server.transport.abort()
        return DROPPED

    def _store(self, session: Session, envelope: Envelope,
               received_at: float, replied: bool) -> int:
        self.accepted += 1
        n = self.accepted
        user = _user(session)
        if user is not None:
            self.accepted_by[user] = self.accepted_by.get(user, 0) + 1
        self.recorder.append({
            "mail_from": _text(envelope.mail_from or ""),
            "rcpt_tos": [_text(r) for r in envelope.rcpt_tos],
            "data_b64": base64.b64encode(
                envelope.original_content or b"").decode("ascii"),
            "received_at": received_at,
            "n": n,
            "helo": _text(session.host_name or ""),
            "replied": replied,
            "user": user,
            "pipelined": getattr(envelope, "pipelined", False),
        })
        return n


def _user(session: Session) -> Optional[str]:
    """The user the session logged in as, if it did."""
    data = getattr(session, "auth_data", None)
    login = getattr(data, "login", None)
    if isinstance(login, bytes):
        return login.decode("utf-8", "replace")
    return None


class GmailLikeSMTP(SMTP):
    """SMTP session using Gmail's AUTH LOGIN challenges."""

    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"


class LoopbackController(Controller):
    """Controller that listens on an OS-chosen port.

    aiosmtpd's Controller opens a connection to (hostname, port) right after
    binding to make the listener create its first session; with port 0 that
    would target port 0, so the real port is read from the listening socket
    first.
    """

    def factory(self) -> SMTP:
        return GmailLikeSMTP(self.handler, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


def make_authenticator(accounts: dict[str, str]):
    expected = {user.encode("utf-8"): password.encode("utf-8")
                for user, password in accounts.items()}

    def authenticate(server: SMTP, session: Session, envelope: Envelope,
                     mechanism: str, auth_data: object) -> AuthResult:
        if (isinstance(auth_data, LoginPassword)
                and auth_data.login in expected
                and auth_data.password == expected[auth_data.login]):
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False,
                          message=BAD_CREDENTIALS)

    return authenticate


def make_tls_context(directory: Path) -> tuple[ssl.SSLContext, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    ca_path = directory / "ca.pem"
    write_atomically(ca_path, ca.cert_pem.bytes())
    return context, ca_path.resolve()


def write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fault-injecting SMTP submission server for hikyaku's "
                    "end-to-end tests.")
    p.add_argument("--ready-file", required=True, type=Path,
                   help='write {"port": N, "ca": PATH|null} here once listening')
    p.add_argument("--record", required=True, type=Path,
                   help="append one JSON line per accepted message")
    p.add_argument("--tls", choices=("starttls", "tls", "none"),
                   default="starttls",
                   help="STARTTLS required (default), implicit TLS, or plain")
    p.add_argument("--user", help="require AUTH with this user name")
    p.add_argument("--password", help="password for --user")
    p.add_argument("--account", action="append", default=[],
                   metavar="USER:PASSWORD",
                   help="also accept AUTH for USER with PASSWORD")
    p.add_argument("--pause-user", action="append", default=[],
                   metavar="USER=N",
                   help="pause USER once N of its messages were accepted")
    p.add_argument("--oauth-token",
                   help="accept AUTH XOAUTH2 for --user with this token")
    p.add_argument("--reject", action="append", default=[],
                   metavar="RCPT=REPLY",
                   help="answer RCPT TO:<RCPT> with REPLY (repeatable)")
    p.add_argument("--transient-rate", type=float, default=0.0, metavar="F",
                   help="probability of a 451 after DATA")
    p.add_argument("--drop-rate", type=float, default=0.0, metavar="F",
                   help="probability of closing the connection after DATA "
                        "without a reply")
    p.add_argument("--store-then-drop-rate", type=float, default=0.0,
                   metavar="F",
                   help="probability of storing the message, then closing "
                        "the connection without a reply")
    p.add_argument("--port", type=int, default=0,
                   help="listen on this port (default: chosen by the OS)")
    p.add_argument("--size-limit", type=int, default=DATA_SIZE_LIMIT,
                   metavar="N", help="advertise SIZE N and refuse larger "
                                     "messages")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for --transient-rate/--drop-rate (default 0)")
    p.add_argument("--pause-after", type=int, metavar="N",
                   help="answer MAIL FROM with --pause-reply once N messages "
                        "have been accepted")
    p.add_argument("--pause-reply", default=DAILY_LIMIT, metavar="REPLY",
                   help="reply for --pause-after (default: Gmail's 550 5.4.5 "
                        "daily limit)")
    p.add_argument("--delay-ms", type=float, default=0.0, metavar="D",
                   help="wait D ms before answering DATA")
    p.add_argument("--no-pipelining", action="store_true",
                   help="do not offer PIPELINING in the EHLO reply")
    p.add_argument("--verbose", action="store_true",
                   help="log the SMTP conversation to stderr")
    args = p.parse_args(argv)
    if (args.user is None) != (args.password is None):
        p.error("--user and --password go together")
    args.accounts = {}
    if args.user is not None:
        args.accounts[args.user] = args.password
    for spec in args.account:
        user, sep, password = spec.partition(":")
        if not sep or not user or not password:
            p.error(f"--account expects USER:PASSWORD, got {spec!r}")
        args.accounts[user] = password
    try:
        args.plan = FaultPlan(args)
    except ValueError as e:
        p.error(str(e))
    return args


def refused_handshake(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return isinstance(error, (TLSSetupException, ssl.SSLError))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="smtp_server %(levelname)s %(name)s: %(message)s")
    # aiosmtpd itself sets the deprecated Session.login_data on every
    # successful AUTH, which logs a warning each time.
    logging.getLogger("mail.log").addFilter(
        lambda record: "login_data is deprecated" not in record.getMessage())
    # A client that refuses the test certificate, as tests check it must,
    # ends the handshake; aiosmtpd logs that with a traceback that reads as
    # a failure of the test run.
    for name in ("mail.log", "asyncio"):
        logging.getLogger(name).addFilter(
            lambda record: not refused_handshake(record))

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    ready_file: Path = args.ready_file.resolve()
    smtp_kwargs: dict = {
        "hostname": "127.0.0.1",
        "port": args.port,
        "server_hostname": "localhost",
        "ident": "ESMTP hikyaku-test - gsmtp",
        "data_size_limit": args.size_limit,
        "enable_SMTPUTF8": True,
    }
    ca_path: Optional[Path] = None
    if args.tls != "none":
        context, ca_path = make_tls_context(ready_file.parent)
        if args.tls == "starttls":
            smtp_kwargs.update(tls_context=context, require_starttls=True)
        else:
            smtp_kwargs.update(ssl_context=context)
    # Implicit TLS is invisible to aiosmtpd's AUTH-needs-TLS check (it only
    # knows about STARTTLS), and --tls none deliberately allows AUTH in clear
    # text on loopback; only starttls keeps the check.
    smtp_kwargs["auth_require_tls"] = args.tls == "starttls"
    if args.accounts:
        smtp_kwargs.update(
            auth_required=True,
            authenticator=make_authenticator(args.accounts))
        warnings.filterwarnings(
            "ignore", message="Requiring AUTH while not requiring TLS")

    recorder = Recorder(args.record)
    handler = FaultyHandler(args.plan, recorder, args.seed,
                           auth_enabled=bool(args.accounts),
                           user=args.user, oauth_token=args.oauth_token)
    controller = LoopbackController(handler, **smtp_kwargs)
    controller.start()
    try:
        ready = {"port": controller.port,
                 "ca": str(ca_path) if ca_path else None}
        write_atomically(ready_file, json.dumps(ready).encode("utf-8"))
        stop.wait()
    finally:
        controller.stop()
        recorder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
