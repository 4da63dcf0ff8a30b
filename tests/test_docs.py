"""The docs stay true: every option in proxy/config.py is in docs/configuration.md, and the
README opens with the two commands a newcomer runs."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from proxy.config import Config

ROOT = Path(__file__).resolve().parent.parent


def _sections() -> dict[str, type[msgspec.Struct]]:
    out: dict[str, type[msgspec.Struct]] = {}
    for field in msgspec.structs.fields(Config):
        kind = field.type
        if field.name == "routes":
            from proxy.config import RouteConfig

            kind = RouteConfig
        assert isinstance(kind, type) and issubclass(kind, msgspec.Struct)
        out[field.name] = kind
    return out


def test_every_config_key_is_documented() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    headings = re.split(r"^## ", text, flags=re.MULTILINE)
    documented: dict[str, str] = {}
    for block in headings[1:]:
        title = block.splitlines()[0]
        match = re.search(r"`\[\[?(\w+)\]\]?`", title)
        if match:
            documented[match.group(1)] = block
    missing = []
    for section, struct in _sections().items():
        block = documented.get(section, "")
        for field in msgspec.structs.fields(struct):
            if f"| `{field.name}` |" not in block:
                missing.append(f"{section}.{field.name}")
    assert not missing, f"undocumented config keys: {missing}"


def test_readme_opens_with_make_run_and_make_test() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    first_block = "\n".join(lines[:8])
    assert "make run" in first_block
    assert "make test" in first_block
