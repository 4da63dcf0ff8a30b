"""conformance/translation.py's own logic: the differences docs/conformance.md explains,
and which differences of a translated run they leave unexplained."""

from __future__ import annotations

from pathlib import Path

from conformance import translation

DOC = """# x

<!-- translation-differences:begin -->
| client era | check | direct | translated | why |
|---|---|---|---|---|
| 2025-11-25 | `tools-call-sampling/tools-call-sampling` | pass | fail | not carried |
| 2026-07-28 | `json-schema-2020-12/json-schema-2020-12-$schema` | pass | - | no such tool |
<!-- translation-differences:end -->

| 2025-11-25 | `outside/the-block` | pass | fail | ignored |
"""


def test_the_explained_differences_are_read_from_between_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "conformance.md"
    doc.write_text(DOC)
    assert translation.explained_differences(doc) == {
        ("2025-11-25", "tools-call-sampling/tools-call-sampling"): ("pass", "fail"),
        ("2026-07-28", "json-schema-2020-12/json-schema-2020-12-$schema"): ("pass", "-"),
    }


def test_only_a_difference_explained_with_its_results_passes(tmp_path: Path) -> None:
    doc = tmp_path / "conformance.md"
    doc.write_text(DOC)
    explained = translation.explained_differences(doc)
    rows = [
        ("tools-call-sampling/tools-call-sampling", "pass", "fail"),  # explained
        ("ping/ping", "pass", "pass"),  # the same: nothing to explain
        ("outside/the-block", "pass", "fail"),  # listed outside the block
        ("tools-list/tools-list", "pass", "warn"),  # not listed
    ]
    assert translation.unexplained("2025-11-25", rows, explained) == [
        ("outside/the-block", "pass", "fail"),
        ("tools-list/tools-list", "pass", "warn"),
    ]
    # Listed with other results: unexplained as it is now.
    changed = [("tools-call-sampling/tools-call-sampling", "pass", "warn")]
    assert translation.unexplained("2025-11-25", changed, explained) == changed
    assert translation.stale_explanations("2025-11-25", rows[1:], explained) == [
        "tools-call-sampling/tools-call-sampling"
    ]


def test_the_projects_own_list_is_well_formed() -> None:
    explained = translation.explained_differences()
    assert explained, "docs/conformance.md lists no translation differences"
    assert {version for version, _ in explained} == {"2025-11-25", "2026-07-28"}
    statuses = {"pass", "fail", "warn", "skip", "info", "error", "-"}
    assert all(d in statuses and t in statuses and d != t for d, t in explained.values())
