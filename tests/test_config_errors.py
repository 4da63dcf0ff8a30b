"""Where a setting came from and which values it takes, as config messages name them."""

from __future__ import annotations

from pathlib import Path

from proxy.config import Config, load
from proxy.config_errors import Origins, enum_choices


def test_origins_name_the_last_layer_that_set_a_key(tmp_path: Path) -> None:
    path = tmp_path / "sb.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:1"]\nworkers = 1\n', encoding="utf-8")
    origins = Origins()
    load(
        path,
        environ={"SWITCHBOARD_SERVER__WORKERS": "2", "SWITCHBOARD_ADMIN__LISTEN": '""'},
        overrides={"log": {"level": "debug"}},
        origins=origins,
    )
    assert origins.describe("server.listen") == f"server.listen in {path}"
    assert origins.describe("server.listen[0]") == f"server.listen[0] in {path}"
    assert origins.describe("server.workers") == "server.workers from SWITCHBOARD_SERVER__WORKERS"
    assert origins.describe("admin.listen") == "admin.listen from SWITCHBOARD_ADMIN__LISTEN"
    assert origins.describe("log.level") == "--log-level"
    assert origins.describe("demo.listen") == "demo.listen, the default"


def test_enum_choices_follow_the_config_tree() -> None:
    assert enum_choices(Config, "forwarding.host") == ("preserve", "rewrite")
    assert enum_choices(Config, "routes[3].host") == ("preserve", "rewrite")  # optional
    assert enum_choices(Config, "redis.fail_mode") == ("open", "closed")
    assert enum_choices(Config, "server.workers") is None
    assert enum_choices(Config, "no.such.key") is None
