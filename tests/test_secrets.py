"""Secret never shows its value; TokenProvider follows a Kubernetes-style rotating secret mount."""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import pytest
import structlog

from bridge.config import ApiSettings
from bridge.errors import ConfigError
from bridge.secrets import Secret, TokenProvider, live_secret_values

TOKEN = "pt-0123456789abcdef"


def test_secret_is_masked_everywhere_it_could_be_printed() -> None:
    """repr, str, f-strings, format specs and a settings dataclass's repr all hide the value."""
    secret = Secret(TOKEN)
    shown = [repr(secret), str(secret), f"{secret}", f"{secret:>40}", "%s" % secret]  # noqa: UP031
    shown.append(repr(ApiSettings(token=secret)))
    for text in shown:
        assert TOKEN not in text
        assert "Secret('**********')" in text
    assert secret.reveal() == TOKEN


def test_secret_equality_and_hash_follow_the_value() -> None:
    """Two Secrets with one value are equal (and hash alike); different values are not."""
    assert Secret(TOKEN) == Secret(TOKEN)
    assert hash(Secret(TOKEN)) == hash(Secret(TOKEN))
    assert Secret(TOKEN) != Secret(TOKEN + "x")
    assert Secret(TOKEN) != TOKEN  # a Secret is not its str


def test_secret_refuses_pickling_but_copies_fine() -> None:
    """Pickling would write the value in clear, so it fails; copy/deepcopy share the value."""
    secret = Secret(TOKEN)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(secret)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(ApiSettings(token=secret))
    assert copy.copy(secret) == secret
    assert copy.deepcopy(ApiSettings(token=secret)).token == secret


def test_live_secret_values_lists_what_the_redactor_must_scrub() -> None:
    """Every live Secret's value is known to the log redactor."""
    secret = Secret("pt-live-value-for-redactor")
    assert secret.reveal() in live_secret_values()


def test_literal_token_is_stripped() -> None:
    """A token pasted with a trailing newline works."""
    provider = TokenProvider(Secret(f"  {TOKEN}\n"))
    assert provider.current().reveal() == TOKEN


def test_literal_token_with_inner_whitespace_is_a_config_error() -> None:
    """Two tokens on one line are a mistake, reported without quoting them."""
    with pytest.raises(ConfigError, match="QODER_ACCESS_TOKEN") as info:
        TokenProvider(Secret("pt-one pt-two"))
    assert "pt-one" not in str(info.value)


def test_neither_or_both_sources_is_a_config_error() -> None:
    """Exactly one of the literal token and the token file."""
    with pytest.raises(ConfigError, match="exactly one"):
        TokenProvider()
    with pytest.raises(ConfigError, match="exactly one"):
        TokenProvider(Secret(TOKEN), Path("/nonexistent"))


def test_missing_token_file_at_startup_names_the_setting(tmp_path: Path) -> None:
    """A token file that does not exist fails start-up with the variable and the path."""
    path = tmp_path / "token"
    with pytest.raises(ConfigError, match="QODER_ACCESS_TOKEN_FILE") as info:
        TokenProvider(token_file=path)
    assert str(path) in str(info.value)


def test_empty_token_file_at_startup_is_a_config_error(tmp_path: Path) -> None:
    """A token file holding only whitespace fails start-up."""
    path = tmp_path / "token"
    path.write_text("\n  \n")
    with pytest.raises(ConfigError, match="is empty"):
        TokenProvider(token_file=path)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SecretMount:
    """A directory laid out like a Kubernetes secret volume:
    ``token -> ..data/token``, ``..data -> ..<timestamp>``; rotation swaps ``..data``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        self.current: Path | None = None

    @property
    def path(self) -> Path:
        return self.root / "token"

    def write(self, value: str) -> None:
        self.generation += 1
        new = self.root / f"..2026_01_01_00_00_{self.generation:02d}.000000001"
        new.mkdir()
        (new / "token").write_text(value)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(new.name)
        os.replace(tmp, self.root / "..data")  # atomic swap, as the kubelet does
        if not self.path.is_symlink():
            self.path.symlink_to("..data/token")
        if self.current is not None:
            (self.current / "token").unlink()
            self.current.rmdir()
        self.current = new


def test_rotation_by_symlink_swap_is_picked_up_within_a_second(tmp_path: Path) -> None:
    """Kubernetes rotates the secret: current() returns the new token once the check interval
    has passed, and never re-reads more often than that."""
    mount = SecretMount(tmp_path)
    mount.write("pt-first-token-value\n")
    clock = FakeClock()
    provider = TokenProvider(token_file=mount.path, clock=clock)
    assert provider.current().reveal() == "pt-first-token-value"

    mount.write("pt-second-token-value\n")
    clock.now += 0.5
    assert provider.current().reveal() == "pt-first-token-value"  # not yet checked again
    clock.now += 0.6
    assert provider.current().reveal() == "pt-second-token-value"


def test_in_place_rewrite_is_picked_up(tmp_path: Path) -> None:
    """A plain file rewritten in place (mtime/size change) is re-read too."""
    path = tmp_path / "token"
    path.write_text("pt-first-token-value")
    clock = FakeClock()
    provider = TokenProvider(token_file=path, clock=clock)
    path.write_text("pt-a-longer-second-token-value")
    clock.now += 1.0
    assert provider.current().reveal() == "pt-a-longer-second-token-value"


def test_file_gone_at_runtime_keeps_the_previous_token_and_warns_once(tmp_path: Path) -> None:
    """The mount disappears mid-run: the bridge keeps using the token it has, logs one
    warning (not one per request), and logs recovery when the file is back."""
    mount = SecretMount(tmp_path)
    mount.write("pt-first-token-value")
    clock = FakeClock()
    provider = TokenProvider(token_file=mount.path, clock=clock)

    (tmp_path / "..data").unlink()
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            clock.now += 1.0
            assert provider.current().reveal() == "pt-first-token-value"
    warnings = [e for e in logs if e["event"] == "bridge.token.reload_failed"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert "pt-first-token-value" not in repr(logs)

    mount.write("pt-second-token-value")
    with structlog.testing.capture_logs() as logs:
        clock.now += 1.0
        assert provider.current().reveal() == "pt-second-token-value"
    assert {e["event"] for e in logs} >= {"bridge.token.reloaded", "bridge.token.file_recovered"}


def test_file_emptied_at_runtime_keeps_the_previous_token(tmp_path: Path) -> None:
    """A half-written (empty) file never replaces a working token."""
    path = tmp_path / "token"
    path.write_text("pt-first-token-value")
    clock = FakeClock()
    provider = TokenProvider(token_file=path, clock=clock)
    path.write_text("")
    clock.now += 1.0
    with structlog.testing.capture_logs() as logs:
        assert provider.current().reveal() == "pt-first-token-value"
    assert [e["event"] for e in logs] == ["bridge.token.reload_failed"]


def test_from_settings_uses_the_api_settings(tmp_path: Path) -> None:
    """The composition root builds the provider straight from ApiSettings."""
    path = tmp_path / "token"
    path.write_text(TOKEN)
    assert TokenProvider.from_settings(ApiSettings(token_file=path)).current() == Secret(TOKEN)
    assert TokenProvider.from_settings(ApiSettings(token=Secret(TOKEN))).token_file is None
