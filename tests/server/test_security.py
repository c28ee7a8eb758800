"""TLS, mutual TLS, bearer tokens and the metrics listener, on real servers with real handshakes.

Certificates come from a throwaway CA (``harness.certificates``). Every "new connection" below
is really new: a raw TLS socket, or a client with its own subchannel pool (gRPC otherwise shares
one connection between channels to the same target).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from harness.certificates import CertificateAuthority, Pki, make_pki, serial_of
from harness.server import LOOPBACK, RunningServer, free_port, server_settings, wait_until
from harness.tiny_models import LSTM_NAME
from pydantic import ValidationError

from protos.inference import grpc_predict_v2_pb2 as v2
from protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from service.channel_security import ChannelSecurity
from service.client import Client, ClientError
from service.server import auth
from service.server.app import SeqServer, StartupError
from service.server.security import SecurityError, ServerSecurity
from service.server.settings import ServeSettings, refused_setting

TOKEN, OTHER_TOKEN, WRONG_TOKEN = "tok-3f9a1c77e2", "tok-b04d6e5aa1", "tok-not-configured"
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
SERVICES = ("seqserve.v1.Classifier", "inference.GRPCInferenceService",
            "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def lstm_repository(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model is enough here, and loads in half the time of two."""
    repository = tmp_path_factory.mktemp("lstm-only") / "repo"
    shutil.copytree(tiny_repository / LSTM_NAME, repository / LSTM_NAME)
    return repository


def token_file(path: Path, *tokens: str) -> Path:
    path.write_text("# rotated by the tests\n\n" + "\n".join(tokens) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tls_token_server(pki: Pki, lstm_repository: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """TLS (no client certificates) and bearer tokens; health open; metrics on."""
    tokens = token_file(tmp_path_factory.mktemp("tokens") / "tokens", TOKEN)
    cert, key = pki.server_files
    running = RunningServer(server_settings(
        lstm_repository, tls_cert_file=cert, tls_key_file=key, auth_token_file=tokens,
        metrics_port=free_port()))
    running.start()
    yield running
    running.close()


@pytest.fixture(scope="module")
def mutual_server(pki: Pki, lstm_repository: Path) -> Iterator[RunningServer]:
    cert, key = pki.server_files
    running = RunningServer(server_settings(lstm_repository, tls_cert_file=cert,
                                            tls_key_file=key, tls_client_ca_file=pki.ca_file))
    running.start()
    yield running
    running.close()


def tls_client(server: RunningServer, pki: Pki, *, token: str | None = None,
               client_files: tuple[Path, Path] | None = None) -> Client:
    cert, key = client_files or (None, None)
    security = ChannelSecurity.from_files(ca_file=pki.ca_file, cert_file=cert, key_file=key,
                                          token=token)
    return Client(server.target, timeout=10, security=security, options=OWN_CONNECTION)


def refused(call: object) -> ClientError:
    with pytest.raises(ClientError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def presented_serial(port: int, pki: Pki) -> int:
    """The serial number of the certificate the server presents to a brand-new connection."""
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    context.set_alpn_protocols(["h2"])
    with (socket.create_connection((LOOPBACK, port), timeout=10) as raw,
          context.wrap_socket(raw, server_hostname="localhost") as tls):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return serial_of(der)


# --- TLS and mutual TLS ------------------------------------------------------------------------

def test_a_plaintext_client_is_refused_on_a_tls_port(tls_token_server: RunningServer) -> None:
    with Client(tls_token_server.target, timeout=5, options=OWN_CONNECTION) as client:
        assert refused(client.health).code == grpc.StatusCode.UNAVAILABLE


def test_a_tls_client_is_served(tls_token_server: RunningServer, pki: Pki) -> None:
    with tls_client(tls_token_server, pki, token=TOKEN) as client:
        assert client.health() == "SERVING"
        result = client.classify(["good film", "bad plot"], model=LSTM_NAME)
    assert [r.label for r in result.results] and result.model == LSTM_NAME


def test_a_client_that_trusts_another_ca_refuses_the_server(tls_token_server: RunningServer,
                                                            tmp_path: Path) -> None:
    other_ca = CertificateAuthority("not the server's CA").write(tmp_path / "other.crt")
    security = ChannelSecurity.from_files(ca_file=other_ca, token=TOKEN)
    with Client(tls_token_server.target, timeout=5, security=security,
                options=OWN_CONNECTION) as client:
        assert refused(client.health).code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_serves_a_client_certificate_from_its_ca(mutual_server: RunningServer,
                                                            pki: Pki) -> None:
    with tls_client(mutual_server, pki, client_files=pki.client_files) as client:
        assert client.classify(["good film"], model=LSTM_NAME).results


def test_mutual_tls_refuses_a_client_without_a_certificate(mutual_server: RunningServer,
                                                           pki: Pki) -> None:
    with tls_client(mutual_server, pki) as client:
        assert refused(lambda: client.classify(["x"], model=LSTM_NAME)).code == (
            grpc.StatusCode.UNAVAILABLE)


def test_mutual_tls_refuses_a_certificate_from_another_ca(mutual_server: RunningServer,
                                                          pki: Pki) -> None:
    with tls_client(mutual_server, pki, client_files=pki.stranger_files) as client:
        assert refused(lambda: client.classify(["x"], model=LSTM_NAME)).code == (
            grpc.StatusCode.UNAVAILABLE)


# --- bearer tokens -----------------------------------------------------------------------------

def test_the_right_token_is_served_and_a_wrong_one_refused(tls_token_server: RunningServer,
                                                           pki: Pki) -> None:
    with tls_client(tls_token_server, pki, token=TOKEN) as client:
        assert client.list_models()[0].name == LSTM_NAME
    with tls_client(tls_token_server, pki, token=WRONG_TOKEN) as client:
        error = refused(lambda: client.classify(["x"], model=LSTM_NAME))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.details == auth.INVALID and WRONG_TOKEN not in error.details


def test_the_async_client_speaks_tls_and_tokens(tls_token_server: RunningServer,
                                                pki: Pki) -> None:
    from service.client import AsyncClient

    async def classify(token: str) -> object:
        security = ChannelSecurity.from_files(ca_file=pki.ca_file, token=token)
        async with AsyncClient(tls_token_server.target, timeout=10, security=security) as client:
            try:
                return await client.classify(["good film"], model=LSTM_NAME)
            except ClientError as error:
                return error.code

    assert asyncio.run(classify(TOKEN)).results  # type: ignore[attr-defined]
    assert asyncio.run(classify(WRONG_TOKEN)) == grpc.StatusCode.UNAUTHENTICATED


def test_health_is_open_but_every_other_service_needs_a_token(tls_token_server: RunningServer,
                                                              pki: Pki) -> None:
    with tls_client(tls_token_server, pki) as client:
        assert client.health() == "SERVING"
        error = refused(lambda: client.classify(["x"], model=LSTM_NAME))
        assert error.code == grpc.StatusCode.UNAUTHENTICATED
        assert error.details.startswith("missing bearer token")
        stream = refused(lambda: list(client.classify_stream(iter([]))))
        assert stream.code == grpc.StatusCode.UNAUTHENTICATED
    credentials = grpc.ssl_channel_credentials(pki.ca_file.read_bytes())
    with grpc.secure_channel(tls_token_server.target, credentials) as channel:
        with pytest.raises(grpc.RpcError) as v2_call:
            v2_grpc.GRPCInferenceServiceStub(channel).ServerLive(v2.ServerLiveRequest(),
                                                                  timeout=10)
        assert v2_call.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Reflection is closed unless auth_open_services opens it; unknown methods are refused
        # like known ones, so a caller without a token cannot map the API.
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        with pytest.raises(grpc.RpcError) as reflection_call:
            list(reflect)
        assert reflection_call.value.code() == grpc.StatusCode.UNAUTHENTICATED
        unknown = channel.unary_unary("/no.such.Service/Call")
        with pytest.raises(grpc.RpcError) as unknown_call:
            unknown(b"", timeout=10)
        assert unknown_call.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as basic:
            unknown(b"", timeout=10, metadata=[("authorization", f"Basic {TOKEN}")])
        assert basic.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert basic.value.details() == auth.MALFORMED
        with pytest.raises(grpc.RpcError) as with_token:
            unknown(b"", timeout=10, metadata=[("authorization", f"bearer {TOKEN}")])
        assert with_token.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_every_configured_token_is_compared_every_time(monkeypatch) -> None:
    tokens = auth.TokenSet(["first-token", "second-token", "third-token"])
    compared = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for presented, accepted in (("first-token", True), ("third-token", True), ("nope", False)):
        compared.clear()
        assert tokens.accepts(presented) is accepted
        assert len(compared) == 3  # no early exit on a match, nor on a miss


def test_token_files_skip_comments_and_never_echo_a_bad_token(tmp_path: Path) -> None:
    good = token_file(tmp_path / "good", "alpha", "  beta  ", "# gamma")
    assert auth.parse_token_file(good) == ["alpha", "beta"]
    bad = tmp_path / "bad"
    bad.write_text("alpha\nsecret with spaces\n", encoding="utf-8")
    with pytest.raises(auth.AuthError) as caught:
        auth.parse_token_file(bad)
    assert "line 2" in str(caught.value) and "secret" not in str(caught.value)


# --- rotation ----------------------------------------------------------------------------------

@pytest.fixture
def rotating(pki: Pki, lstm_repository: Path, tmp_path: Path, start_server) -> RunningServer:
    """A TLS server whose certificate files live in a directory the test may rewrite."""
    cert, key = pki.server.write(tmp_path / "live", "server")
    return start_server(server_settings(lstm_repository, tls_cert_file=cert, tls_key_file=key))


def test_a_rotated_certificate_is_presented_without_a_restart(rotating: RunningServer,
                                                              pki: Pki, caplog) -> None:
    live = Path(rotating.server.settings.tls_cert_file).parent
    port = rotating.server.port
    assert presented_serial(port, pki) == pki.server.serial_number
    # A half-done rotation (a new certificate beside the old key) keeps the old pair serving.
    pki.authority.issue_server("half rotated").write(live, "server")
    (live / "server.key").write_bytes(pki.server.key_pem)
    assert presented_serial(port, pki) == pki.server.serial_number
    assert "rotation refused" in caplog.text and "does not belong" in caplog.text
    # A whole new pair is noticed at the next handshake: no signal, no restart.
    renewed = pki.authority.issue_server("renewed")
    renewed.write(live, "server")
    assert presented_serial(port, pki) == renewed.serial_number
    with Client(rotating.target, timeout=10, options=OWN_CONNECTION,
                security=ChannelSecurity.from_files(ca_file=pki.ca_file)) as client:
        assert client.classify(["good film"], model=LSTM_NAME).results


def test_sighup_rereads_the_certificates(rotating: RunningServer, pki: Pki) -> None:
    live = Path(rotating.server.settings.tls_cert_file).parent
    renewed = pki.authority.issue_server("renewed on SIGHUP")
    renewed.write(live, "server")
    certificates = rotating.server.security.certificates
    assert certificates is not None
    assert certificates.reload()  # what serve()'s SIGHUP handler calls
    assert not certificates.reload()  # unchanged files: nothing new to serve
    assert presented_serial(rotating.server.port, pki) == renewed.serial_number


def test_sighup_rotates_the_token_file_and_tokens_stay_out_of_the_log(
        lstm_repository: Path, tmp_path: Path, monkeypatch) -> None:
    from harness.processes import serve_process

    env_token = "tok-from-the-environment"
    monkeypatch.setenv("SEQSERVE_AUTH_TOKENS", env_token)
    tokens = token_file(tmp_path / "tokens", TOKEN)
    process, target = serve_process(
        lstm_repository, "--metrics-port", "0", "--auth-token-file", str(tokens),
        "--auth-open-services", "grpc.health.v1.Health,grpc.reflection.v1alpha.ServerReflection")

    def answers(token: str) -> bool:
        security = ChannelSecurity(token=token)  # plaintext: tokens work behind a TLS proxy
        with Client(target, timeout=10, security=security, options=OWN_CONNECTION) as client:
            try:
                client.list_models()
            except ClientError as error:
                assert error.code == grpc.StatusCode.UNAUTHENTICATED
                return False
            return True

    try:
        assert answers(TOKEN) and answers(env_token) and not answers(OTHER_TOKEN)
        with grpc.insecure_channel(target) as channel:  # opened: reflection needs no token
            reply = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            assert reply.list_services_response.service
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        token_file(tokens, OTHER_TOKEN)
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: answers(OTHER_TOKEN), timeout=20)
        assert not answers(TOKEN) and answers(env_token)
    finally:
        process.terminate()
        assert process.wait(30) == 0
    log = process.stderr.read()  # type: ignore[union-attr]
    assert "token file reloaded: 2 token(s) in force" in log  # file + environment
    assert "auth_tokens=<set, not shown> (env)" in log
    for token in (TOKEN, OTHER_TOKEN, env_token):
        assert token not in log


# --- start-up checks ---------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    ({"tls_cert_file": "server.crt"}, "tls_cert_file and tls_key_file go together"),
    ({"tls_client_ca_file": "ca.crt"}, "tls_client_ca_file (mutual TLS) needs tls_cert_file"),
    ({"tls_cert_file": "missing.crt", "tls_key_file": "server.key"},
     "invalid setting tls_cert_file: {dir}/missing.crt: no such file"),
    ({"auth_token_file": "."}, "invalid setting auth_token_file: {dir}: not a file"),
    ({"auth_open_services": "grpc.health.v1.Health, not a name"},
     "invalid setting auth_open_services: 'not a name' is not a gRPC service name"),
])
def test_settings_refuse_unusable_security_files(pki: Pki, overrides: dict[str, str],
                                                  message: str) -> None:
    values = {k: (v if k == "auth_open_services" else pki.directory / v)
              for k, v in overrides.items()}
    with pytest.raises(ValidationError) as caught:
        server_settings(pki.directory, **values)
    assert message.format(dir=pki.directory) in refused_setting(caught.value)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"tls_key_file": "client.key"}, "the key does not belong to the certificate"),
    ({"tls_cert_file": "server.key"}, "no PEM certificate in it"),
    ({"tls_client_ca_file": "server.key"}, "tls_client_ca_file"),
    ({"auth_token_file": "comments-only"}, "no token in it"),
    ({"auth_tokens": "good,with space"}, "auth_tokens: token 2 of 2 must be visible ASCII"),
    ({"auth_tokens": TOKEN, "auth_open_services": "grpc.health.v1.Healthy"},
     "grpc.health.v1.Healthy is not a service of this server"),
])
def test_unusable_certificates_or_tokens_stop_the_start(pki: Pki, overrides: dict[str, str],
                                                        message: str) -> None:
    token_file(pki.directory / "comments-only")
    cert, key = pki.server_files
    values: dict[str, object] = {"tls_cert_file": cert, "tls_key_file": key}
    for name, value in overrides.items():
        literal = name in ("auth_tokens", "auth_open_services")
        values[name] = value if literal else pki.directory / value
    settings = server_settings(pki.directory, **values)
    with pytest.raises(SecurityError) as caught:
        ServerSecurity(settings).load(SERVICES)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert "with space" not in str(caught.value)
    # The server turns it into its one-line start-up failure, before opening any port.
    async def start() -> None:
        await SeqServer(settings).start()

    with pytest.raises(StartupError, match=message.split(":")[0]):
        asyncio.run(start())


def test_the_startup_log_never_shows_a_token(pki: Pki) -> None:
    settings = ServeSettings(repository=pki.directory, auth_tokens=f"{TOKEN},{OTHER_TOKEN}")
    lines = settings.describe()
    assert any(line.startswith("auth_tokens=<set, not shown> (") for line in lines)
    assert not any(TOKEN in line or OTHER_TOKEN in line for line in lines)
    assert TOKEN not in repr(settings) and TOKEN not in str(settings)


# --- the metrics listener ----------------------------------------------------------------------

def http_status(url: str, method: str = "GET") -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method),
                                    timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_metrics_port_answers_metrics_only(tls_token_server: RunningServer) -> None:
    base = f"http://{LOOPBACK}:{tls_token_server.server.settings.metrics_port}"
    assert http_status(f"{base}/metrics") == 200
    assert http_status(f"{base}/metrics?name[]=seqserve_model_ready") == 200
    for path in ("/", "/favicon.ico", "/metrics/", "/metricsx", "/admin"):
        assert http_status(f"{base}{path}") == 404, path
    assert http_status(f"{base}/metrics", method="POST") == 405


def test_metrics_listen_on_loopback_unless_told_otherwise() -> None:
    assert ServeSettings.model_fields["metrics_host"].default == "127.0.0.1"
