"""The fast registry reader gives exactly what the YAML reader gives: the same devices, lines and errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.errors import SourceError
from pdp.registry import file as registry_file
from pdp.registry.file import parse_registry

FP = "sha256:" + "ab" * 32
DEVICE = "  - id: s1\n    type: sensor\n    location: a\n    purpose: p\n    owner: o\n    status: active\n"

GOOD = [
    "devices:\n" + DEVICE,
    "# fleet\n\ndevices:   # all of them\n" + DEVICE + "\n# more\n  - {id: s2, type: t, location: a, purpose: p, owner: o, status: suspended}\n",
    "devices:\n- id: s1\n  type: sensor\n  location: a\n  purpose: p\n  owner: o\n  status: active\n",
    "devices:\n  -   id: s1\n      type: sensor\n      location: a\n      purpose: p\n      owner: o\n      status: active\n",
    "devices:\n" + DEVICE + f"    fingerprints: [\"{FP}\", '{FP.upper()}']\n",
    "devices:\n" + DEVICE + f"    fingerprints:\n      - \"{FP}\"\n      - {FP[7:]}\n",
    "devices:\n" + DEVICE + f"    fingerprints:\n    - '{FP}'\n",
    "devices:\n" + DEVICE + "    fingerprints: []\n",
    "devices:\n" + DEVICE + f"    fingerprints: [\"{FP}\"]\n" + DEVICE.replace("s1", "s2") + f"    fingerprints: [\"{FP[7:].upper()}\"]\n",
    "devices:\n  - id: \"quoted id\"\n    type: 'x.y'\n    location: null\n    purpose: '123'\n    owner: 0x1F  # hex? no: text\n    status: active\n",
    "devices:\n  - {id: s1, type: a, location: b, purpose: c, owner: d, status: retired, fingerprints: [" + f"'{FP}'" + "],}\n",
    "devices:\n" + DEVICE + "  # a comment between devices\n" + DEVICE.replace("s1", "s2"),
    "devices:\n  - id: s1\n    type: sensor\n\n    location: a\n    # inside\n    purpose: p\n    owner: o\n    status: active\n",
]

BAD = [
    "devices:\n" + DEVICE + DEVICE,  # duplicate id
    "devices:\n" + DEVICE.replace("    owner: o\n", ""),  # missing field
    "devices:\n" + DEVICE + "    color: red\n",  # unknown field
    "devices:\n" + DEVICE + "    type: again\n",  # given twice
    "devices:\n" + DEVICE.replace("status: active", "status: gone"),
    "devices:\n" + DEVICE.replace("status: active", "status: Active"),
    "devices:\n" + DEVICE + f"    fingerprints: [\"{FP[:-2]}\"]\n",
    "devices:\n" + DEVICE.replace("id: s1", "id: " + "x" * 129),
    "devices:\n" + DEVICE.replace("location: a", "location: 'a/b'"),
    "devices:\n" + DEVICE.replace("id: s1", "id: '$sys'"),
    "devices:\n" + DEVICE.replace("id: s1", "id: ' s1'"),
    "devices:\n" + DEVICE + "    fingerprints: [\"sha256:abc\"]\n",
    "devices:\n" + DEVICE + f"    fingerprints:\n      - \"{FP}\"\n      - nothex\n",
    "devices:\n" + DEVICE + f"    fingerprints: ['{FP}']\n    fingerprints: ['{FP}']\n",
    "devices:\n  - {id: s1, id: s2, type: a, location: b, purpose: c, owner: d, status: active}\n",
    "devices:\n  - {id: s1, type: [a], location: b, purpose: c, owner: d, status: active}\n",
    "devices:\n" + DEVICE + "  - {id: s1, type: a, location: b, purpose: c, owner: d, status: active}\n",
]

OUTSIDE = [  # valid or invalid, these are the YAML reader's to judge
    "devices: []\n",
    "devices:\n",
    "devices:\n  - &a {id: s1, type: a, location: b, purpose: c, owner: d, status: active}\n",
    "devices:\n" + DEVICE + "    fingerprints:\n",
    "devices:\n" + DEVICE.replace("type: sensor", "type: two words"),
    "devices:\n" + DEVICE.replace("type: sensor", "type:\n      - sensor"),
    "devices:\n" + DEVICE.replace("owner: o", "owner: \"o\\tx\""),
    "devices:\n" + DEVICE + "other: 1\n",
    "devices:\n" + DEVICE.replace("\n", "\r\n"),
    "devices:\n" + DEVICE + "  -\n    id: s2\n",
    "---\ndevices:\n" + DEVICE,
    "devices:\n" + DEVICE.replace("    purpose: p\n", "    purpose: p\n     q\n"),
    "devices:\n" + DEVICE.rstrip("\n"),
    "devices:\n" + DEVICE.replace("owner: o", "owner: o\x07"),
]


def _outcome(reader: object, text: str) -> object:
    try:
        registry = reader(text, "reg.yaml")  # type: ignore[operator]
    except SourceError as exc:
        return ("error", str(exc))
    return ("ok", dict(registry.devices), dict(registry.lines), registry.revision)


@pytest.mark.parametrize("text", GOOD + BAD)
def test_fast_reader_matches_the_yaml_reader(text: str) -> None:
    fast = _outcome(lambda t, p: registry_file._parse_simple(t, p, {}), text)
    assert fast == _outcome(registry_file._parse_yaml, text)


@pytest.mark.parametrize("text", GOOD)
def test_good_files_are_read_by_the_fast_reader(text: str) -> None:
    assert _outcome(lambda t, p: registry_file._parse_simple(t, p, {}), text)[0] == "ok"


@pytest.mark.parametrize("text", BAD)
def test_bad_files_are_errors_with_a_line(text: str) -> None:
    outcome = _outcome(registry_file._parse_yaml, text)
    assert outcome[0] == "error" and str(outcome[1]).startswith("reg.yaml:")


@pytest.mark.parametrize("text", OUTSIDE)
def test_files_outside_the_subset_go_to_the_yaml_reader(text: str) -> None:
    with pytest.raises(registry_file._NotSimple):
        registry_file._parse_simple(text, "reg.yaml", {})
    assert _outcome(parse_registry, text) == _outcome(registry_file._parse_yaml, text)


def test_an_edit_rereads_only_the_changed_device() -> None:
    devices = "".join(DEVICE.replace("s1", f"d{i}") for i in range(50))
    first = parse_registry("devices:\n" + devices, "reg.yaml")
    edited = "devices:\n" + devices.replace("id: d7\n    type: sensor\n    location: a", "id: d7\n    type: sensor\n    location: b")
    second = parse_registry(edited, "reg.yaml", first)
    assert second == registry_file._parse_yaml(edited, "reg.yaml")
    assert second.lines == registry_file._parse_yaml(edited, "reg.yaml").lines
    assert second.devices["d7"].location == "b" and first.devices["d7"].location == "a"
    assert all(second.devices[k] is first.devices[k] for k in first.devices if k != "d7")
    # a device inserted at the top moves every line; the reused devices keep their new lines
    shifted = "devices:\n" + DEVICE.replace("s1", "new") + devices
    third = parse_registry(shifted, "reg.yaml", first)
    assert dict(third.lines) == dict(registry_file._parse_yaml(shifted, "reg.yaml").lines)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab\n- \u00e9\x01", max_size=80), sep=st.sampled_from(["\n  - ", "a", "- ", "\n- "]))
def test_piecewise_scan_split_and_hash_equal_the_one_call_versions(text: str, sep: str) -> None:
    """The reader works on large texts a piece at a time (so a reload thread hands the GIL back between pieces);
    with tiny pieces every boundary case occurs, and the results must equal the one-call versions."""
    import hashlib

    from pdp.registry import file as reader

    original = reader._PIECE
    reader._PIECE = 7
    try:
        assert reader._split(text, sep) == text.split(sep)
        assert reader.text_revision(text) == hashlib.sha256(text.encode()).hexdigest()[:12]
        assert reader._outside_subset(text) == bool(reader._OUTSIDE_SUBSET.search(text))
    finally:
        reader._PIECE = original


@pytest.mark.parametrize("device_id", ["sens*", "*", "a*b"])
def test_a_device_id_with_the_client_id_wildcard_is_refused_at_its_line(device_id: str) -> None:
    """'*' is the client id pattern's wildcard: a device 'sens*' could claim the client id 'sensor-1'
    and take over that device's session (found by an outside attack). Both readers refuse it."""
    text = "devices:\n" + DEVICE + DEVICE.replace("id: s1", f"id: '{device_id}'")
    for reader_text in (text, text.replace("devices:\n", "devices:   # a comment keeps the fast path off\n")):
        with pytest.raises(SourceError) as refused:
            parse_registry(reader_text, "devices.yaml")
        assert refused.value.line == 8 and "'*'" in str(refused.value)
