"""Shared fixtures: the licensed Story Cloze data beside the checkout, and an environment that is the
same on every machine.

Whatever the caller's shell holds, tests see no proxy settings, no HF_* or *_OFFLINE settings, no
torchrun variables, caches in a temporary folder, one fixed matmul formulation, and no network but
loopback, in this process and in every subprocess a test starts. This happens at import, before
transformers or huggingface_hub read their settings, and the autouse fixture restores it after every test.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.data_paths import STORY_CLOZE  # paths only: nothing that reads the environment

STORY_CLOZE_MISSING = (f"the real Story Cloze CSVs (research use, not in the repository) are not at {STORY_CLOZE}: "
                       "put the shared data beside the checkout to run these tests")
NETWORK_GUARD = Path(__file__).resolve().parent / "network_guard"

_PROXIES = {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "FTP_PROXY", "WS_PROXY", "WSS_PROXY"}
_TORCHRUN = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_RUN_ID"}


def _caller_setting(name: str) -> bool:
    upper = name.upper()
    return (upper in _PROXIES or upper in _TORCHRUN or upper.endswith("_OFFLINE")
            or upper.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "GPT2_TOOLKIT_", "TIKTOKEN_")))


for _name in [name for name in os.environ if _caller_setting(name)]:
    del os.environ[_name]
_CACHES = Path(tempfile.mkdtemp(prefix="gpt2-toolkit-tests-"))
os.environ.update(HF_HOME=str(_CACHES / "huggingface"), GPT2_TOOLKIT_CACHE=str(_CACHES / "gpt2-toolkit"),
                  TIKTOKEN_CACHE_DIR=str(_CACHES / "tiktoken"))
# Subprocesses load network_guard/sitecustomize.py at startup; this process imports it now.
os.environ["PYTHONPATH"] = os.pathsep.join([str(NETWORK_GUARD), *filter(None, [os.environ.get("PYTHONPATH")])])
_guard_spec = importlib.util.spec_from_file_location("_network_guard", NETWORK_GUARD / "sitecustomize.py")
_guard_spec.loader.exec_module(importlib.util.module_from_spec(_guard_spec))  # installs the guard here
_CLEAN_ENVIRONMENT = dict(os.environ)
_GUARDED = (socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_CACHES, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = [report for report in terminalreporter.stats.get("skipped", [])
               if STORY_CLOZE_MISSING in str(report.longrepr)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} tests skipped: {STORY_CLOZE_MISSING} (with CI=true they fail "
                                    "instead)", yellow=True, bold=True)


@pytest.fixture(autouse=True)
def _clean_environment() -> Iterator[None]:
    """Every test starts from the clean environment and the network guard, whatever the last one did."""
    _restore_environment()
    socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = _GUARDED
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:  # imported before this conftest (by a plugin?) with the caller's settings
        hub_constants.HF_HUB_OFFLINE = False
    yield
    _restore_environment()


def _restore_environment() -> None:
    for name in [name for name in os.environ if name not in _CLEAN_ENVIRONMENT]:
        if not name.startswith("PYTEST_"):  # pytest's own, e.g. PYTEST_CURRENT_TEST
            del os.environ[name]
    os.environ.update(_CLEAN_ENVIRONMENT)


@pytest.fixture(scope="session")
def story_cloze() -> Path:
    """The folder of the real Story Cloze 2016 CSVs: required in CI (CI=true), skipped with a reason
    elsewhere. Every other test's data is in the repository (tests/data_paths.py)."""
    if not STORY_CLOZE.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(STORY_CLOZE_MISSING)
        pytest.skip(STORY_CLOZE_MISSING)
    return STORY_CLOZE


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to resolve a host or open a connection fails at once, loopback included."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled by the no_network test fixture")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shakespeare_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Shakespeare as fineweb.py writes it: a paragraph per document, 32k val tokens, 100k-token shards."""
    import fineweb
    from tests.data_paths import SHAKESPEARE

    out = tmp_path_factory.mktemp("shakespeare")
    fineweb.main(["--input", str(SHAKESPEARE), "--txt-paragraphs",
                  "--out", str(out), "--prefix", "shakespeare", "--val-tokens", "32768", "--shard-size", "100000",
                  "--workers", "1"])
    return out
