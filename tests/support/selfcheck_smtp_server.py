#!/usr/bin/env python3
"""Self-check for smtp_server.py, the SMTP server of the end-to-end tests.

Starts the server as a subprocess in several configurations and talks to it
with smtplib (and a raw socket where the exact bytes matter), checking
authentication, recipient rejection, the sending-limit pause, dropped
connections, transient failures, delays, implicit TLS and plain text.

Run with ``python3 tests/support/selfcheck_smtp_server.py``; exits non-zero
if any check fails.
"""

from __future__ import annotations

import base64
import json
import random
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

SERVER = Path(__file__).resolve().with_name("smtp_server.py")

BAD_CREDENTIALS = (
    "535 5.7.8 Username and Password not accepted. For more information, "
    "go to https://support.google.com/mail/?p=BadCredentials"
)
DAILY_LIMIT = (
    "550 5.4.5 Daily user sending limit exceeded. For more information on "
    "Gmail sending limits go to https://support.google.com/a/answer/166852"
)
NO_SUCH_USER = ("550 5.1.1 The email account that you tried to reach does "
                "not exist.")
TRANSIENT = "451 4.3.0 Mail server temporarily rejected message."

USER = "sender@example.com"
PASSWORD = "app password 123"


class CheckFailed(Exception):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def reply(code: int, text: bytes) -> str:
    return f"{code} {text.decode()}"


def message(n: int, size: int = 0) -> bytes:
    body = b"".join(b"line %d of the body\r\n" % i for i in range(size // 24))
    return (b"From: " + USER.encode() + b"\r\nTo: rcpt@example.org\r\n"
            b"Subject: message %d\r\n\r\nHello %d\r\n" % (n, n) + body)


class Server:
    """smtp_server.py running in a subprocess inside a temporary directory."""

    def __init__(self, *args: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="smtp-selfcheck-"))
        self.ready_file = self.dir / "ready.json"
        self.record = self.dir / "record.jsonl"
        self.stderr = open(self.dir / "stderr.log", "w+b")
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), "--ready-file", str(self.ready_file),
             "--record", str(self.record), *args],
            stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr)
        deadline = time.monotonic() + 15
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise CheckFailed(f"server exited with {self.proc.returncode}"
                                  f" before ready:\n{self.log()}")
            if time.monotonic() > deadline:
                raise CheckFailed("server not ready within 15 s")
            time.sleep(0.02)
        ready = json.loads(self.ready_file.read_text())
        expect(set(ready) == {"port", "ca"}, f"ready file keys: {ready}")
        self.port: int = ready["port"]
        self.ca: Optional[str] = ready["ca"]
        expect(isinstance(self.port, int) and self.port > 0,
               f"bad port {self.port!r}")

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def context(self) -> ssl.SSLContext:
        expect(self.ca is not None, "no CA in ready file")
        expect(Path(self.ca).is_file(), f"CA file {self.ca} missing")
        return ssl.create_default_context(cafile=self.ca)

    def records(self) -> list[dict]:
        lines = self.record.read_text().splitlines()
        return [json.loads(line) for line in lines]

    def connect(self, starttls: bool = False, login: Optional[str] = None,
                implicit_tls: bool = False) -> smtplib.SMTP:
        if implicit_tls:
            s: smtplib.SMTP = smtplib.SMTP_SSL(
                "127.0.0.1", self.port, timeout=10, context=self.context())
        else:
            s = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
        s.ehlo("client.example")
        if starttls:
            s.starttls(context=self.context())
            s.ehlo("client.example")
        if login == "PLAIN":
            s.user, s.password = USER, PASSWORD
            s.auth("PLAIN", s.auth_plain)
        elif login == "LOGIN":
            s.user, s.password = USER, PASSWORD
            s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        return s

    def stop(self, signum: int = signal.SIGTERM) -> None:
        expect(self.proc.poll() is None,
               f"server died with {self.proc.returncode}:\n{self.log()}")
        self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise CheckFailed(f"server still running 5 s after {signum!r}")
        expect(self.proc.returncode == 0,
               f"server exited with {self.proc.returncode}:\n{self.log()}")

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()
        for path in sorted(self.dir.iterdir()):
            path.unlink()
        self.dir.rmdir()


def transact(s: smtplib.SMTP, rcpts: list[str], data: bytes,
             sender: str = USER) -> str:
    """Run one transaction; return the first non-2xx reply or the DATA reply."""
    code, text = s.mail(sender)
    if code != 250:
        return reply(code, text)
    for rcpt in rcpts:
        code, text = s.rcpt(rcpt)
        if code not in (250, 251):
            return reply(code, text)
    code, text = s.data(data)
    return reply(code, text)


def check_starttls_auth(srv: Server) -> None:
    s = srv.connect()
    expect("auth" not in s.esmtp_features, "AUTH offered before STARTTLS")
    code, text = s.mail(USER)
    expect(code == 530, f"MAIL before STARTTLS: {code} {text!r}")
    s.starttls(context=srv.context())
    s.ehlo("client.example")
    expect(set(s.esmtp_features["auth"].split()) >= {"PLAIN", "LOGIN"},
           f"AUTH mechanisms: {s.esmtp_features.get('auth')!r}")
    expect(int(s.esmtp_features["size"]) >= 50_000_000,
           f"SIZE {s.esmtp_features['size']}")
    code, text = s.mail(USER)
    expect(code == 530, f"MAIL before AUTH: {code} {text!r}")
    try:
        s.login(USER, "wrong password")
        raise CheckFailed("wrong password accepted")
    except smtplib.SMTPAuthenticationError as e:
        got = reply(e.smtp_code, e.smtp_error)
        expect(got == BAD_CREDENTIALS, f"wrong password reply: {got!r}")
    s.quit()

    for n, mechanism in ((1, "PLAIN"), (2, "LOGIN")):
        s = srv.connect(starttls=True, login=mechanism)
        data = message(n)
        before = time.time()
        got = transact(s, ["rcpt@example.org", "Second@Example.net"], data)
        after = time.time()
        s.quit()
        expect(got == f"250 2.0.0 OK {n} - gsmtp", f"{mechanism}: {got!r}")
        records = srv.records()
        expect(len(records) == n, f"{len(records)} records after {n} sends")
        rec = records[-1]
        expect(set(rec) == {"mail_from", "rcpt_tos", "data_b64",
                            "received_at", "n", "helo", "replied"},
               f"record keys {set(rec)}")
        expect(rec["replied"] is True, f"replied {rec['replied']!r}")
        expect(rec["n"] == n, f"record n {rec['n']}")
        expect(rec["mail_from"] == USER, f"mail_from {rec['mail_from']!r}")
        expect(rec["rcpt_tos"] == ["rcpt@example.org", "Second@Example.net"],
               f"rcpt_tos {rec['rcpt_tos']!r}")
        expect(base64.b64decode(rec["data_b64"]) == data, "data mismatch")
        expect(before - 1 <= rec["received_at"] <= after + 1,
               f"received_at {rec['received_at']} not in [{before}, {after}]")


def check_large_message(srv: Server) -> None:
    data = message(1, size=3 * 1024 * 1024)
    s = srv.connect(starttls=True, login="PLAIN")
    got = transact(s, ["rcpt@example.org"], data)
    s.quit()
    expect(got == "250 2.0.0 OK 1 - gsmtp", f"large message: {got!r}")
    expect(base64.b64decode(srv.records()[0]["data_b64"]) == data,
           "large message data mismatch")


def check_reject(srv: Server) -> None:
    s = srv.connect(starttls=True)
    expect("auth" not in s.esmtp_features, "AUTH offered without --user")
    code, text = s.mail(USER)
    expect(code == 250, f"MAIL: {code} {text!r}")
    code, text = s.rcpt("BAD@example.com")
    expect(reply(code, text) == NO_SUCH_USER, f"rejected RCPT: {code} {text!r}")
    code, text = s.rcpt("good@example.com")
    expect(code == 250, f"good RCPT: {code} {text!r}")
    code, text = s.data(message(1))
    expect(reply(code, text) == "250 2.0.0 OK 1 - gsmtp",
           f"DATA: {code} {text!r}")
    try:
        s.sendmail(USER, ["bad@example.com"], message(2))
        raise CheckFailed("sendmail to a rejected address succeeded")
    except smtplib.SMTPRecipientsRefused as e:
        code, text = e.recipients["bad@example.com"]
        expect(reply(code, text) == NO_SUCH_USER, f"{code} {text!r}")
    s.quit()
    records = srv.records()
    expect(len(records) == 1, f"{len(records)} records")
    expect(records[0]["rcpt_tos"] == ["good@example.com"],
           f"rcpt_tos {records[0]['rcpt_tos']!r}")


def check_pause(srv: Server) -> None:
    s = srv.connect(starttls=True, login="PLAIN")
    for n in (1, 2):
        got = transact(s, ["rcpt@example.org"], message(n))
        expect(got == f"250 2.0.0 OK {n} - gsmtp", f"message {n}: {got!r}")
    got = transact(s, ["rcpt@example.org"], message(3))
    expect(got == DAILY_LIMIT, f"third message: {got!r}")
    s.quit()
    s = srv.connect(starttls=True, login="LOGIN")
    got = transact(s, ["rcpt@example.org"], message(4))
    expect(got == DAILY_LIMIT, f"on a new connection: {got!r}")
    s.quit()
    expect(len(srv.records()) == 2, f"{len(srv.records())} records")


def check_pause_custom_reply(srv: Server) -> None:
    s = srv.connect()
    got = transact(s, ["rcpt@example.org"], message(1))
    expect(got == "421 4.7.0 Try again later", f"pause-after 0: {got!r}")
    s.quit()
    expect(srv.records() == [], "paused server recorded a message")


def check_drop_starttls(srv: Server) -> None:
    s = srv.connect(starttls=True)
    try:
        transact(s, ["rcpt@example.org"], message(1))
        raise CheckFailed("DATA got a reply")
    except smtplib.SMTPServerDisconnected:
        pass
    finally:
        s.close()
    expect(srv.records() == [], "dropped message was recorded")


def check_drop_raw(srv: Server) -> None:
    """With --tls none: no single byte follows the 354 once DATA ends."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        f = sock.makefile("rb")

        def command(line: bytes) -> bytes:
            sock.sendall(line + b"\r\n")
            while True:
                answer = f.readline()
                expect(answer != b"", f"EOF after {line!r}")
                if answer[3:4] != b"-":
                    return answer

        expect(f.readline().startswith(b"220 "), "no greeting")
        expect(command(b"EHLO client.example").startswith(b"250 "), "EHLO")
        expect(command(b"MAIL FROM:<a@example.com>").startswith(b"250"), "MAIL")
        expect(command(b"RCPT TO:<b@example.org>").startswith(b"250"), "RCPT")
        expect(command(b"DATA").startswith(b"354"), "DATA")
        sock.sendall(message(1) + b".\r\n")
        try:
            rest = f.read()
        except ConnectionResetError:
            rest = b""
        expect(rest == b"", f"server replied {rest!r} instead of dropping")
    expect(srv.records() == [], "dropped message was recorded")


def check_drop_implicit_tls(srv: Server) -> None:
    s = srv.connect(implicit_tls=True)
    try:
        transact(s, ["rcpt@example.org"], message(1))
        raise CheckFailed("DATA got a reply")
    except smtplib.SMTPServerDisconnected:
        pass
    finally:
        s.close()


def check_transient(srv: Server) -> None:
    s = srv.connect(starttls=True)
    for n in (1, 2):
        got = transact(s, ["rcpt@example.org"], message(n))
        expect(got == TRANSIENT, f"message {n}: {got!r}")
    s.quit()
    expect(srv.records() == [], "temporarily rejected message was recorded")


def check_seeded_mix(srv: Server) -> None:
    """--drop-rate 0.3 --transient-rate 0.3 --seed 7 follows Random(7)."""
    rng = random.Random(7)
    accepted = 0
    s = None
    for n in range(1, 21):
        draw = rng.random()
        if s is None:
            s = srv.connect(starttls=True)
        try:
            got = transact(s, ["rcpt@example.org"], message(n))
        except smtplib.SMTPServerDisconnected:
            got = "dropped"
            s.close()
            s = None
        if draw < 0.3:
            want = "dropped"
        elif draw < 0.6:
            want = TRANSIENT
        else:
            accepted += 1
            want = f"250 2.0.0 OK {accepted} - gsmtp"
        expect(got == want, f"message {n}: {got!r}, expected {want!r}")
    if s is not None:
        s.quit()
    expect(accepted > 0 and len(srv.records()) == accepted,
           f"{len(srv.records())} records, {accepted} accepted")


def check_delay(srv: Server) -> None:
    s = srv.connect()
    s.mail(USER)
    s.rcpt("rcpt@example.org")
    start = time.monotonic()
    code, text = s.data(message(1))
    elapsed = time.monotonic() - start
    s.quit()
    expect(code == 250, f"DATA: {code} {text!r}")
    expect(elapsed >= 0.4, f"DATA answered after {elapsed:.3f} s")


def check_implicit_tls(srv: Server) -> None:
    s = srv.connect(implicit_tls=True)
    expect("starttls" not in s.esmtp_features, "STARTTLS offered on TLS")
    code, text = s.mail(USER)
    expect(code == 530, f"MAIL before AUTH: {code} {text!r}")
    try:
        s.login(USER, "nope")
        raise CheckFailed("wrong password accepted")
    except smtplib.SMTPAuthenticationError as e:
        got = reply(e.smtp_code, e.smtp_error)
        expect(got == BAD_CREDENTIALS, f"wrong password reply: {got!r}")
    s.login(USER, PASSWORD)
    got = transact(s, ["rcpt@example.org"], message(1))
    s.quit()
    expect(got == "250 2.0.0 OK 1 - gsmtp", f"DATA: {got!r}")
    expect(len(srv.records()) == 1, "message not recorded")


def check_plain(srv: Server) -> None:
    expect(srv.ca is None, f"ca is {srv.ca!r} with --tls none")
    s = srv.connect()
    expect("starttls" not in s.esmtp_features, "STARTTLS offered")
    expect("auth" not in s.esmtp_features, "AUTH offered without --user")
    code, text = s.docmd("AUTH", "PLAIN " + base64.b64encode(
        b"\0" + USER.encode() + b"\0" + PASSWORD.encode()).decode())
    expect(code == 502, f"AUTH without --user: {code} {text!r}")
    got = transact(s, ["rcpt@example.org"], message(1))
    s.quit()
    expect(got == "250 2.0.0 OK 1 - gsmtp", f"DATA: {got!r}")
    expect(len(srv.records()) == 1, "message not recorded")


def check_plain_auth(srv: Server) -> None:
    expect(srv.ca is None, f"ca is {srv.ca!r} with --tls none")
    s = srv.connect()
    code, text = s.mail(USER)
    expect(code == 530, f"MAIL before AUTH: {code} {text!r}")
    try:
        s.login(USER, "nope")
        raise CheckFailed("wrong password accepted")
    except smtplib.SMTPAuthenticationError as e:
        expect(reply(e.smtp_code, e.smtp_error) == BAD_CREDENTIALS,
               f"wrong password reply: {e.smtp_code} {e.smtp_error!r}")
    s.quit()
    s = srv.connect(login="LOGIN")
    got = transact(s, ["rcpt@example.org"], message(1))
    s.quit()
    expect(got == "250 2.0.0 OK 1 - gsmtp", f"DATA: {got!r}")
    expect(len(srv.records()) == 1, "message not recorded")


AUTH = ("--user", USER, "--password", PASSWORD)
CHECKS: list[tuple[str, tuple[str, ...], Callable[[Server], None], int]] = [
    ("starttls + auth", AUTH, check_starttls_auth, signal.SIGTERM),
    ("starttls large message", AUTH, check_large_message, signal.SIGINT),
    ("reject recipient", ("--reject", f"bad@example.com={NO_SUCH_USER}"),
     check_reject, signal.SIGTERM),
    ("pause after 2", (*AUTH, "--pause-after", "2"), check_pause,
     signal.SIGTERM),
    ("pause after 0, custom reply", ("--tls", "none", "--pause-after", "0",
                                     "--pause-reply",
                                     "421 4.7.0 Try again later"),
     check_pause_custom_reply, signal.SIGTERM),
    ("drop with starttls", ("--drop-rate", "1.0"), check_drop_starttls,
     signal.SIGTERM),
    ("drop, raw bytes", ("--tls", "none", "--drop-rate", "1.0"),
     check_drop_raw, signal.SIGINT),
    ("drop with implicit tls", ("--tls", "tls", "--drop-rate", "1"),
     check_drop_implicit_tls, signal.SIGTERM),
    ("transient", ("--transient-rate", "1.0"), check_transient,
     signal.SIGTERM),
    ("seeded drop/transient mix", ("--drop-rate", "0.3", "--transient-rate",
                                   "0.3", "--seed", "7"),
     check_seeded_mix, signal.SIGTERM),
    ("delay", ("--tls", "none", "--delay-ms", "400"), check_delay,
     signal.SIGTERM),
    ("implicit tls + auth", ("--tls", "tls", *AUTH), check_implicit_tls,
     signal.SIGTERM),
    ("plain, no auth", ("--tls", "none"), check_plain, signal.SIGTERM),
    ("plain + auth", ("--tls", "none", *AUTH), check_plain_auth,
     signal.SIGINT),
]


def main() -> int:
    passed = failed = 0
    for name, args, check, stop_signal in CHECKS:
        srv = None
        try:
            srv = Server(*args)
            check(srv)
            srv.stop(stop_signal)
            log = srv.log()
            expect("Traceback" not in log and "ERROR" not in log,
                   f"server logged errors:\n{log}")
            print(f"PASS {name}")
            passed += 1
        except Exception as e:
            failed += 1
            print(f"FAIL {name}: {e}")
            if not isinstance(e, CheckFailed):
                traceback.print_exc()
            if srv is not None:
                print(f"--- server log ---\n{srv.log()}--- end ---")
        finally:
            if srv is not None:
                srv.cleanup()
    print(f"selfcheck: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
