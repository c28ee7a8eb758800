"""``seqserve classify`` against a real mutual-TLS server that wants a bearer token."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.certificates import Pki, make_pki
from harness.server import RunningServer, server_settings
from harness.tiny_models import LSTM_NAME

from service.cli.main import main

TOKEN, WRONG_TOKEN = "cli-token-5e1f0b", "cli-token-wrong"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    (pki.directory / "token").write_text(f"# the CLI's token\n{TOKEN}\n", encoding="utf-8")
    return pki


@pytest.fixture(scope="module")
def secured_server(pki: Pki, tiny_repository: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("lstm-only") / "repo"
    shutil.copytree(tiny_repository / LSTM_NAME, repository / LSTM_NAME)
    cert, key = pki.server_files
    running = RunningServer(server_settings(
        repository, tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=pki.ca_file,
        auth_tokens=TOKEN))
    running.start()
    yield running
    running.close()


@pytest.fixture(autouse=True)
def no_token_in_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("SEQSERVE_TOKEN", raising=False)


def classify(server: RunningServer, pki: Pki, *flags: str, mutual: bool = True) -> list[str]:
    cert, key = pki.client_files
    tls = ["--tls-ca", str(pki.ca_file)]
    if mutual:
        tls += ["--tls-cert", str(cert), "--tls-key", str(key)]
    return ["classify", "--server", server.target, "--deadline", "10", "--model", LSTM_NAME,
            *tls, *flags, "good film", "bad plot"]


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_every_flag_together(secured_server: RunningServer, pki: Pki, capsys) -> None:
    argv = classify(secured_server, pki, "--token-file", str(pki.directory / "token"))
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[-1] for line in lines] == ["good film", "bad plot"]


def test_the_token_from_the_environment(secured_server: RunningServer, pki: Pki, capsys,
                                        monkeypatch) -> None:
    monkeypatch.setenv("SEQSERVE_TOKEN", TOKEN)
    assert main(classify(secured_server, pki)) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_the_token_flag_still_works(secured_server: RunningServer, pki: Pki, capsys) -> None:
    assert main(classify(secured_server, pki, "--token", TOKEN)) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_a_missing_or_wrong_token_is_a_server_error(secured_server: RunningServer, pki: Pki,
                                                    capsys, monkeypatch) -> None:
    assert main(classify(secured_server, pki)) == 4
    assert one_error_line(capsys).startswith(
        "seqserve: error: UNAUTHENTICATED: missing bearer token")
    monkeypatch.setenv("SEQSERVE_TOKEN", WRONG_TOKEN)
    assert main(classify(secured_server, pki)) == 4
    line = one_error_line(capsys)
    assert line == "seqserve: error: UNAUTHENTICATED: invalid bearer token"
    assert WRONG_TOKEN not in line


def test_plaintext_or_no_client_certificate_is_unavailable(secured_server: RunningServer,
                                                           pki: Pki, capsys) -> None:
    plaintext = ["classify", "--server", secured_server.target, "--deadline", "10", "--model",
                 LSTM_NAME, "--token", TOKEN, "good film"]
    assert main(plaintext) == 4
    line = one_error_line(capsys)
    assert line.startswith("seqserve: error: UNAVAILABLE: ") and "--tls-ca" in line
    assert main(classify(secured_server, pki, "--token", TOKEN, mutual=False)) == 4
    assert one_error_line(capsys).startswith("seqserve: error: UNAVAILABLE: ")


@pytest.mark.parametrize(("flags", "message"), [
    (["--tls-cert", "{dir}/client.crt"], "--tls-cert and --tls-key go together"),
    (["--tls-ca", "{dir}/missing.crt"], "--tls-ca {dir}/missing.crt: no such file"),
    (["--token-file", "{dir}"], "--token-file {dir}: not a file"),
    (["--token-file", "{dir}/token", "--token", TOKEN], "--token-file and --token"),
    (["--token-file", "{dir}/ca.crt"], "token file {dir}/ca.crt: its token must be visible"),
    (["--tls-ca", "{dir}/client.key"], "CA certificates {dir}/client.key: not PEM"),
    (["--tls-cert", "{dir}/client.crt", "--tls-key", "{dir}/client.crt"],
     "client key {dir}/client.crt: not PEM"),
])
def test_bad_security_flags_are_usage_errors(pki: Pki, capsys, flags: list[str],
                                             message: str) -> None:
    argv = ["classify", "--server", "127.0.0.1:1", "--model", LSTM_NAME,
            *[flag.format(dir=pki.directory) for flag in flags], "good film"]
    assert main(argv) == 2
    assert one_error_line(capsys).startswith(
        f"seqserve: error: {message.format(dir=pki.directory)}")
