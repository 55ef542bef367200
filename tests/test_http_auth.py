"""``[http] auth`` over real sockets: no patient picture without a login.

A job store holds one processed CT series (the thumbnails are real); :class:`StatusServer` is run
in-process with basic or bearer auth, the status page is rendered by headless Chromium with
credentials, HTTPS is checked with a test CA made by ``openssl`` (:class:`tests.support.Pki`), and
``dicom-node serve`` / ``config check`` are run as processes for the refusals and the wiring.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from node.config import BasicAuth, BearerAuth, ConfigError, HttpSettings, load_config
from node.app.http.server import StatusServer
from node.app.http.auth import BLOCK_SECONDS, MAX_FAILURES, FailedLogins, HttpGuard
from node.net.tls import https_server_context
from tests.support import NodeProcess, Pki, chromium_screenshot, folder_route, free_port, node_config, run_cli
from tests.support.status_rows import SC_PIPELINE, JobRows, png_image

USER = "ops"
PASSWORD = "correct:horse-battery"  # a ':' in the password: only the first one separates the user
TOKEN = "t0ken-of-the-metrics-scraper"
PASSWORD_ENV = "TEST_DICOM_NODE_HTTP_PASSWORD"
TOKEN_ENV = "TEST_DICOM_NODE_HTTP_TOKEN"
LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobRows]:
    node = JobRows.create(tmp_path_factory.mktemp("node"))
    node.ids["delivered"] = node.processed_series("delivered", 3, SC_PIPELINE).id
    yield node
    node.jobs.close()


@pytest.fixture(scope="module")
def secrets() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PASSWORD_ENV, PASSWORD)
        patch.setenv(TOKEN_ENV, TOKEN)
        yield


def make_server(node: JobRows, guard: HttpGuard | None, tls: ssl.SSLContext | None = None) -> StatusServer:
    return node.status_server(guard=guard, tls=tls)


@pytest.fixture(scope="module")
def basic(node: JobRows, secrets: None) -> Iterator[StatusServer]:
    server = make_server(node, HttpGuard(BasicAuth(USER, PASSWORD_ENV)))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bearer(node: JobRows, secrets: None) -> Iterator[StatusServer]:
    server = make_server(node, HttpGuard(BearerAuth(TOKEN_ENV)))
    server.start()
    yield server
    server.stop()


def protected_paths(node: JobRows) -> list[str]:
    series = node.ids["delivered"]
    return ["/", "/?state=delivered", "/api/jobs", f"/api/jobs/{series}", f"/thumbs/{series}/source.png",
            f"/thumbs/{series}/output.png", "/metrics", f"/series/{series}"]


def get(server: StatusServer, path: str, **kwargs: object) -> requests.Response:
    return requests.get(server.url + path, timeout=30, **kwargs)


class Bearer(requests.auth.AuthBase):
    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


# --------------------------------------------------------------------------- 401 and 200


def test_basic_without_or_with_wrong_credentials_is_401(node: JobRows, basic: StatusServer) -> None:
    wrong = [None, (USER, "wrong"), ("root", PASSWORD), (USER, PASSWORD + "x"), (USER, PASSWORD[:-1])]
    for path in protected_paths(node):
        for auth in wrong:
            response = get(basic, path, auth=auth)
            assert response.status_code == 401, (path, auth)
            assert response.headers["WWW-Authenticate"] == 'Basic realm="dicom-node", charset="UTF-8"'
            assert response.headers["Content-Type"].startswith("application/json")
            assert b"PNG" not in response.content[:8] and "<html" not in response.text
        basic.guard.failures.succeeded(LOOPBACK)  # these tests are not about the rate limit
    for header in (f"Bearer {PASSWORD}", "Basic", "Basic !!!notbase64", "Basic " + base64.b64encode(b"ops").decode(),
                   "Digest " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()):
        response = get(basic, "/api/jobs", headers={"Authorization": header})
        assert response.status_code == 401, header
    basic.guard.failures.succeeded(LOOPBACK)


def test_basic_with_credentials_is_served(node: JobRows, basic: StatusServer) -> None:
    auth = (USER, PASSWORD)
    page = get(basic, "/", auth=auth)
    assert page.status_code == 200 and f'href="/api/jobs/{node.ids["delivered"]}"' in page.text
    jobs = get(basic, "/api/jobs", auth=auth)
    assert jobs.status_code == 200 and jobs.json()[0]["series_uid"] == node.series_uids["delivered"]
    assert get(basic, f"/api/jobs/{node.ids['delivered']}", auth=auth).json()["id"] == node.ids["delivered"]
    for kind in ("source", "output"):
        thumb = get(basic, f"/thumbs/{node.ids['delivered']}/{kind}.png", auth=auth)
        assert thumb.status_code == 200, kind
        assert max(png_image(thumb).size) == 128
    metrics = get(basic, "/metrics", auth=auth)
    assert metrics.status_code == 200
    assert "dicomnode_instances_received" in {f.name for f in text_string_to_metric_families(metrics.text)}
    # the scheme is case-insensitive (RFC 9110 11.1)
    raw = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert get(basic, "/api/jobs", headers={"Authorization": f"basic {raw}"}).status_code == 200


def test_bearer_without_or_with_wrong_token_is_401(node: JobRows, bearer: StatusServer) -> None:
    for path in protected_paths(node):
        response = get(bearer, path)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="dicom-node"'
        for wrong in (Bearer(TOKEN + "x"), Bearer(TOKEN.upper()), Bearer(""), (USER, TOKEN)):
            response = get(bearer, path, auth=wrong)
            assert response.status_code == 401, (path, wrong)
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="dicom-node", error="invalid_token"'
        bearer.guard.failures.succeeded(LOOPBACK)


def test_bearer_with_token_is_served(node: JobRows, bearer: StatusServer) -> None:
    for path in protected_paths(node):
        response = get(bearer, path, auth=Bearer(TOKEN))
        assert response.status_code == 200, path
    assert "prometheus" not in get(bearer, "/", auth=Bearer(TOKEN)).headers["Content-Type"]


@pytest.mark.parametrize("fixture", ["basic", "bearer"])
def test_probes_need_no_login(fixture: str, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue(fixture)
    assert get(server, "/healthz").text == "ok\n"
    assert get(server, "/readyz").text == "ready\n"
    assert get(server, "/healthz", headers={"Authorization": "Basic d3Jvbmc6d3Jvbmc="}).status_code == 200
    assert get(server, "/healthz/").status_code == 401  # only the probes as routed, nothing beside them


def test_other_methods_need_a_login_too(basic: StatusServer) -> None:
    assert requests.post(basic.url + "/api/jobs", timeout=30).status_code == 401
    assert requests.post(basic.url + "/api/jobs", auth=(USER, PASSWORD), timeout=30).status_code == 405
    head = requests.head(basic.url + "/", timeout=30)
    assert head.status_code == 401 and head.headers["WWW-Authenticate"].startswith("Basic ")


def test_public_metrics_opens_metrics_only(node: JobRows, secrets: None) -> None:
    server = make_server(node, HttpGuard(BasicAuth(USER, PASSWORD_ENV), public_metrics=True))
    server.start()
    try:
        metrics = get(server, "/metrics")
        assert metrics.status_code == 200 and metrics.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        for path in protected_paths(node):
            if path != "/metrics":
                assert get(server, path).status_code == 401, path
    finally:
        server.stop()


def test_utf8_password_and_guard_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 7617 charset="UTF-8": the password's UTF-8 bytes, as browsers send them."""
    monkeypatch.setenv(PASSWORD_ENV, "grüß-Gott")
    guard = HttpGuard.for_settings(HttpSettings("127.0.0.1", 8080, auth=BasicAuth("ärztin", PASSWORD_ENV)))
    assert guard is not None and guard.kind == "basic"
    good = "Basic " + base64.b64encode("ärztin:grüß-Gott".encode()).decode()
    latin1 = "Basic " + base64.b64encode("ärztin:grüß-Gott".encode("latin-1")).decode()
    assert guard.refusal("/", good, "192.0.2.1") is None
    refusal = guard.refusal("/", latin1, "192.0.2.1")
    assert refusal is not None and refusal.status == 401
    assert HttpGuard.for_settings(HttpSettings("127.0.0.1", 8080)) is None


def test_a_missing_secret_is_a_config_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"node.toml:7: http.auth.password_env: environment variable {PASSWORD_ENV}"):
        HttpGuard(BasicAuth(USER, PASSWORD_ENV, where="node.toml:7: http.auth.password_env"))
    monkeypatch.setenv(TOKEN_ENV, "")
    with pytest.raises(ConfigError, match=f"{TOKEN_ENV} .* is empty"):
        HttpGuard(BearerAuth(TOKEN_ENV))


# --------------------------------------------------------------------------- failures: 429 and the log


def test_429_after_the_tenth_failure_and_the_log_never_holds_the_password(
    node: JobRows, secrets: None, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server(node, HttpGuard(BasicAuth(USER, PASSWORD_ENV)))
    server.start()
    tried = [f"guess-{n}-{os.urandom(4).hex()}" for n in range(MAX_FAILURES)]
    try:
        with caplog.at_level(logging.DEBUG, logger="node.app.http.auth"):
            for _ in range(3):  # no credentials at all is no attempt
                assert get(server, "/").status_code == 401
            for n, guess in enumerate(tried, start=1):
                response = get(server, "/api/jobs", auth=(USER, guess))
                assert response.status_code == 401, f"failure {n}"
            for auth in ((USER, PASSWORD), (USER, "another-guess"), None):
                blocked = get(server, "/api/jobs", auth=auth)
                assert blocked.status_code == 429, auth
                assert 55 <= int(blocked.headers["Retry-After"]) <= BLOCK_SECONDS
                assert "WWW-Authenticate" not in blocked.headers
            assert get(server, f"/thumbs/{node.ids['delivered']}/source.png", auth=(USER, PASSWORD)).status_code == 429
            assert get(server, "/healthz").status_code == 200 and get(server, "/readyz").status_code == 200
    finally:
        server.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[0] == "HTTP '/api/jobs' from 127.0.0.1: wrong credentials (401)"  # the first at once
    assert warnings[1] == (f"HTTP: {MAX_FAILURES} failed logins from 127.0.0.1 within 60 s: every request from it "
                           f"refused (429) for 60 s")
    assert len(warnings) == 2, warnings  # the other failures were held back (one line a minute per address)
    text = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    for secret in (*tried, PASSWORD, "another-guess", base64.b64encode(f"{USER}:{tried[0]}".encode()).decode()):
        assert secret not in text


def test_failed_logins_count_within_the_window_and_block_for_a_minute() -> None:
    now = [1000.0]
    failures = FailedLogins(clock=lambda: now[0])
    for _ in range(MAX_FAILURES - 1):
        assert not failures.failed("192.0.2.1")
        now[0] += 7.0  # 9 failures spread over 63 s: the first has left the window by the tenth
    assert not failures.failed("192.0.2.1") and failures.blocked_for("192.0.2.1") == 0.0
    assert failures.failed("192.0.2.1")  # the tenth within 60 s
    assert failures.blocked_for("192.0.2.1") == BLOCK_SECONDS and failures.blocked_for("192.0.2.2") == 0.0
    now[0] += BLOCK_SECONDS - 1
    assert failures.blocked_for("192.0.2.1") == pytest.approx(1.0)
    now[0] += 1
    assert failures.blocked_for("192.0.2.1") == 0.0
    for _ in range(MAX_FAILURES - 1):  # the block wiped the count; right credentials wipe it too
        assert not failures.failed("192.0.2.1")
    failures.succeeded("192.0.2.1")
    assert not failures.failed("192.0.2.1")


def test_the_log_line_of_wrong_credentials_says_how_many_were_held_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    now = [0.0]
    guard = HttpGuard(BearerAuth(TOKEN_ENV), failures=FailedLogins(limit=1000, clock=lambda: now[0]))
    monkeypatch.setattr(guard._log_throttle, "_clock", lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="node.app.http.auth"):
        for _ in range(5):
            assert guard.refusal("/metrics", "Bearer nope", "198.51.100.7").status == 401
        now[0] += 61
        guard.refusal("/metrics", "Bearer nope", "198.51.100.7")
    assert [r.getMessage() for r in caplog.records] == [
        "HTTP '/metrics' from 198.51.100.7: wrong credentials (401)",
        "HTTP '/metrics' from 198.51.100.7: wrong credentials (401) (4 more from it since the last such line)",
    ]


# --------------------------------------------------------------------------- in a browser


def test_status_page_in_a_browser_with_credentials(node: JobRows, basic: StatusServer, tmp_path: Path) -> None:
    """Headless Chromium logs in with the URL's credentials; the thumbnails are drawn (they need them too)."""
    def screenshot(url: str, name: str) -> tuple[np.ndarray | None, str]:
        shot = tmp_path / name
        result = chromium_screenshot(url, shot, (1280, 600), tmp_path, profile=f"profile-{name}")
        if not shot.is_file():
            return None, result.stderr
        picture = Image.open(shot)
        picture.load()
        return np.asarray(picture.convert("L")), result.stderr

    host = basic.url.removeprefix("http://")
    logged_in, log = screenshot(f"http://{USER}:{requests.utils.quote(PASSWORD, safe='')}@{host}/", "in.png")
    assert logged_in is not None, f"no screenshot:\n{log[-3000:]}"
    assert logged_in.std() > 10 and len(np.unique(logged_in)) > 32, "the page was not drawn"
    assert (logged_in > 200).mean() > 0.2 and (logged_in < 40).mean() > 0.005, "no thumbnails"
    # without credentials (or with wrong ones) headless Chromium cancels the login: no page at all
    for url, name in ((f"http://{host}/", "none.png"), (f"http://{USER}:wrong@{host}/", "wrong.png")):
        refused, log = screenshot(url, name)
        assert refused is None and "ERR_INVALID_AUTH_CREDENTIALS" in log, name
    basic.guard.failures.succeeded(LOOPBACK)


# --------------------------------------------------------------------------- HTTPS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def test_https_with_a_test_ca(node: JobRows, pki: Pki, secrets: None) -> None:
    settings = HttpSettings(LOOPBACK, 8080, auth=BasicAuth(USER, PASSWORD_ENV), cert_file=pki.cert("server"),
                            key_file=pki.key("server"))
    context = https_server_context(settings)
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2
    server = make_server(node, HttpGuard.for_settings(settings), context)
    server.start()
    try:
        assert server.url.startswith("https://127.0.0.1:")
        ca = str(pki.cert("ca"))
        assert get(server, "/", verify=ca).status_code == 401
        page = get(server, "/", verify=ca, auth=(USER, PASSWORD))
        assert page.status_code == 200 and "dicom-node" in page.text
        assert get(server, "/healthz", verify=ca).text == "ok\n"
        with pytest.raises(requests.exceptions.SSLError):  # the certificate is checked: another CA
            get(server, "/healthz", verify=str(pki.cert("other")))
        with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP is not served on the port
            requests.get(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
        # TLS 1.2 is served (this OpenSSL offers nothing older to try: the minimum is checked above)
        client = ssl.create_default_context(cafile=ca)
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        with client.wrap_socket(socket.create_connection((LOOPBACK, server.port), timeout=10),
                                server_hostname=LOOPBACK) as connection:
            assert connection.version() == "TLSv1.2"
        assert get(server, "/api/jobs", verify=ca, auth=(USER, PASSWORD)).status_code == 200  # still serving
    finally:
        server.stop()
    assert https_server_context(HttpSettings(LOOPBACK, 8080)) is None


def test_basic_auth_over_plain_http_on_another_address_is_warned_about(
    node: JobRows, basic: StatusServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The check takes the bound address; a documentation address stands for "another machine's"."""
    with caplog.at_level(logging.WARNING, logger="node.app.http.server"):
        basic._warn_if_exposed("127.0.0.1")
        basic._warn_if_exposed("::1")
        assert not caplog.records
        basic._warn_if_exposed("0.0.0.0")
        anonymous = make_server(node, None)
        anonymous._warn_if_exposed("192.0.2.10")
        secured = make_server(node, basic.guard, ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        secured._warn_if_exposed("192.0.2.10")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("HTTP basic auth over plain HTTP on http://127.0.0.1:")
    assert "reverse proxy terminates TLS" in messages[0]
    assert "without a login ([http] allow_anonymous = true)" in messages[1]


# --------------------------------------------------------------------------- config and serve

HTTP_HEAD = """\
[node]
host = "127.0.0.1"
port = 11112
data_dir = "var"

[http]
"""


def check(tmp_path: Path, http_lines: str, *, machine: bool = True) -> str:
    path = tmp_path / "node.toml"
    path.write_text(HTTP_HEAD + http_lines)
    with pytest.raises(ConfigError) as info:
        load_config(path, check_machine=machine)
    return str(info.value)


@pytest.mark.parametrize(("lines", "line", "key", "message"), [
    ('host = "0.0.0.0"\nport = 8080\n', 7, "http.host",
     '"0.0.0.0" is not a loopback address and [http] has no auth: anyone who reaches it would see the status '
     "page and patient images"),
    ('port = 8080\nhost = "::"\npublic_metrics = true\n', 8, "http.host", '"::" is not a loopback address'),
    ('host = "0.0.0.0"\ncert_file = "server.pem"\nauth = { kind = "basic", username = "ops", password_env = '
     f'"{PASSWORD_ENV}" }}\n', 8, "http.cert_file", "HTTPS needs cert_file and key_file together: add key_file"),
    ('key_file = "server.key"\n', 7, "http.key_file", "HTTPS needs cert_file and key_file together: add cert_file"),
    ('auth = { kind = "digest", username = "ops", password_env = "X" }\n', 7, "http.auth.kind",
     'must be one of basic, bearer, got "digest"'),
    ('auth = { kind = "bearer", token = "literal" }\n', 7, "http.auth.token",
     "unknown key (did you mean 'token_env'?)"),
    ('auth = { kind = "bearer", token_env = "X" }\nallow_anonymous = true\n', 8, "http.allow_anonymous",
     "contradicts auth"),
    ('public_metrics = "yes"\n', 7, "http.public_metrics", 'must be true or false, got "yes"'),
    ('cert_file = "nowhere.pem"\nkey_file = "server.key"\n', 7, "http.cert_file", "no such file"),
    ('cert_file = "server.key"\nkey_file = "server.key"\n', 7, "http.cert_file", "no PEM certificate in it"),
    ('allow_anonymus = true\n', 7, "http.allow_anonymus", "unknown key (did you mean 'allow_anonymous'?)"),
    ('host = "0.0.0.0"\nauth = { kind = "basic", username = "ops", password_env = "TEST_NO_SUCH_VARIABLE" }\n', 8,
     "http.auth.password_env", "environment variable TEST_NO_SUCH_VARIABLE (password for basic auth) is not set"),
], ids=["anyone", "anyone-v6", "cert-without-key", "key-without-cert", "unknown-kind", "literal-token",
        "anonymous-and-auth", "public-metrics-text", "cert-missing", "cert-not-pem", "typo", "secret-unset"])
def test_refusals_name_file_line_and_key(tmp_path: Path, pki: Pki, secrets: None, lines: str, line: int, key: str,
                                         message: str) -> None:
    for name in ("server.pem", "server.key"):
        (tmp_path / name).write_bytes((pki.cert("server") if name.endswith("pem") else pki.key("server")).read_bytes())
    error = check(tmp_path, lines)
    assert error.startswith(f"{tmp_path / 'node.toml'}:{line}: {key}: "), error
    assert message in error, error


def test_accepted_http_settings(tmp_path: Path, pki: Pki, secrets: None) -> None:
    path = tmp_path / "node.toml"
    accepted = [
        ('host = "localhost"\n', HttpSettings("localhost", 8080)),  # a loopback name
        ('host = "::1"\n', HttpSettings("::1", 8080)),
        ('host = "0.0.0.0"\nallow_anonymous = true\n', HttpSettings("0.0.0.0", 8080, allow_anonymous=True)),
        (f'host = "0.0.0.0"\npublic_metrics = true\n[http.auth]\nkind = "bearer"\ntoken_env = "{TOKEN_ENV}"\n',
         HttpSettings("0.0.0.0", 8080, auth=BearerAuth(TOKEN_ENV), public_metrics=True)),
        (f'cert_file = "{pki.cert("server")}"\nkey_file = "{pki.key("server")}"\n'
         f'auth = {{ kind = "basic", username = "ops", password_env = "{PASSWORD_ENV}" }}\n',
         HttpSettings("127.0.0.1", 8080, auth=BasicAuth("ops", PASSWORD_ENV), cert_file=pki.cert("server"),
                      key_file=pki.key("server"))),
    ]
    for lines, expected in accepted:
        path.write_text(HTTP_HEAD + lines)
        assert load_config(path, check_machine=True).http == expected, lines
    # without the machine check the host is not resolved: nothing is refused for it (status, retry, ...)
    path.write_text(HTTP_HEAD + 'host = "0.0.0.0"\n')
    assert load_config(path).http == HttpSettings("0.0.0.0", 8080)


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_cli(*args, env=env, timeout=timeout)


def test_serve_and_config_check_refuse_a_non_loopback_host_without_auth_in_one_line(tmp_path: Path) -> None:
    """data_dir is a file, refused right after [http] host: should that check go, serve still never listens."""
    http_port = free_port()
    (tmp_path / "data.txt").write_text("a file where data_dir should be")
    text = node_config(tmp_path / "data.txt", free_port(), http_port=http_port, http_keys={"host": "0.0.0.0"})
    config = tmp_path / "node.toml"
    config.write_text(text)
    line = text.splitlines().index('host = "0.0.0.0"') + 1
    for args in (("serve", "--config", str(config)), ("config", "check", str(config))):
        result = _cli(*args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert re.search(rf" ERROR node\.app\.cli: {re.escape(str(config))}:{line}: http\.host: \"0\.0\.0\.0\" is not a "
                         r"loopback address and \[http\] has no auth", lines[0]), lines[0]
        assert result.stdout == ""
    # said on purpose: accepted (config check only: it listens nowhere)
    config.write_text(text.replace('host = "0.0.0.0"\n', 'host = "0.0.0.0"\nallow_anonymous = true\n')
                      .replace(str(tmp_path / "data.txt"), str(tmp_path / "data")))
    accepted = _cli("config", "check", str(config))
    assert accepted.returncode == 0, accepted.stderr


def test_serve_with_auth_over_https(tmp_path: Path, pki: Pki) -> None:
    """The real service: [http] auth and cert_file/key_file from the file, the password from the environment."""
    port, http_port = free_port(), free_port()
    http = {"cert_file": pki.cert("server"), "key_file": pki.key("server"),
            "auth": {"kind": "basic", "username": USER, "password_env": PASSWORD_ENV}}
    text = node_config(tmp_path / "data", port, http_port=http_port, http_keys=http,
                       extra=folder_route(tmp_path / "out"))
    assert "cert_file" in text
    url, ca = f"https://127.0.0.1:{http_port}", str(pki.cert("ca"))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(PASSWORD_ENV, raising=False)
        (tmp_path / "node.toml").write_text(text)
        missing = _cli("serve", "--config", str(tmp_path / "node.toml"))
        assert missing.returncode == 2 and f"environment variable {PASSWORD_ENV}" in missing.stderr
        assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
        patch.setenv(PASSWORD_ENV, PASSWORD)
        with NodeProcess(text, tmp_path, port=port) as node_process:
            assert requests.get(url + "/healthz", verify=ca, timeout=30).text == "ok\n"
            assert requests.get(url + "/readyz", verify=ca, timeout=30).status_code == 200
            for path in ("/", "/api/jobs", "/metrics", "/thumbs/1/source.png"):
                response = requests.get(url + path, verify=ca, timeout=30)
                assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Basic "), path
            assert requests.get(url + "/api/jobs", verify=ca, auth=(USER, PASSWORD), timeout=30).json() == []
            assert requests.get(url + "/metrics", verify=ca, auth=(USER, PASSWORD), timeout=30).status_code == 200
            assert requests.get(url + "/", verify=ca, auth=(USER, "nope"), timeout=30).status_code == 401
            log = node_process.log()
    assert f"HTTP status on {url}/ (metrics on /metrics; basic auth)" in log
    assert "HTTP '/' from 127.0.0.1: wrong credentials (401)" in log
    assert PASSWORD not in log and "nope" not in log


def test_the_documented_http_keys_load_as_documented(tmp_path: Path, pki: Pki, secrets: None) -> None:
    """config/node.toml's commented [http] examples, switched on one at a time, give the settings they describe."""
    documented = Path(__file__).resolve().parents[1] / "config" / "node.toml"
    shipped = documented.read_text()
    assert load_config(documented).http == HttpSettings("127.0.0.1", 8080)
    examples = {
        '#   auth = { kind = "basic", username = "ops", password_env = "DICOM_NODE_HTTP_PASSWORD" }':
            {"auth": BasicAuth("ops", "DICOM_NODE_HTTP_PASSWORD")},
        '#   auth = { kind = "bearer", token_env = "DICOM_NODE_HTTP_TOKEN" }    # Authorization: Bearer TOKEN':
            {"auth": BearerAuth("DICOM_NODE_HTTP_TOKEN")},
        "# public_metrics = false": {"public_metrics": False},
        "# allow_anonymous = false": {"allow_anonymous": False},
    }
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "status.pem").write_bytes(pki.cert("server").read_bytes())
    (tmp_path / "tls" / "status.key").write_bytes(pki.key("server").read_bytes())
    both = '# cert_file = "tls/status.pem"\n# key_file = "tls/status.key"'
    assert both in shipped
    for line, fields in examples.items():
        assert shipped.count(line + "\n") == 1, line
        text = shipped.replace(line + "\n", line.lstrip("# ") + "\n")
        (tmp_path / "node.toml").write_text(text)
        assert load_config(tmp_path / "node.toml").http == HttpSettings("127.0.0.1", 8080, **fields), line
    (tmp_path / "node.toml").write_text(shipped.replace(both, both.replace("# ", "")))
    assert load_config(tmp_path / "node.toml").http == HttpSettings(
        "127.0.0.1", 8080, cert_file=tmp_path / "tls" / "status.pem", key_file=tmp_path / "tls" / "status.key")
